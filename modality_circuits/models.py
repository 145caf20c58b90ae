"""Loading VLMs through nnsight, and the one table of model-specific knowledge.

Everything an algorithm needs to know about a model family (where the decoder
layers live, which token ids are image tokens, how many heads) is read from
`ADAPTERS` here; the algorithms never name a module path themselves.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch

#: Short names of the study's three models (and the embedded default).
SHORT_NAMES = {
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen": "Qwen/Qwen2-VL-7B-Instruct",
    "pixtral-12b": "mistral-community/pixtral-12b",
    "pixtral": "mistral-community/pixtral-12b",
    "gemma-3-12b": "google/gemma-3-12b-it",
    "gemma": "google/gemma-3-12b-it",
}


@dataclass(frozen=True)
class Adapter:
    """Model-family facts. Paths are relative to the transformers model (or its nnsight envoy)."""

    family: str
    model_class: str  # transformers class that loads the checkpoint
    layers: str = "model.language_model.layers"
    text_config: str = "text_config"
    attn_out: str = "self_attn.o_proj"  # per-head outputs are this module's input
    mlp_out: str = "mlp.down_proj"  # neurons are this module's input
    extra_image_tokens: tuple[str, ...] = ()  # tokens the image expands into besides the image token
    image_placeholder: str = "<image>"  # what the chat template writes for an image


ADAPTERS: dict[str, Adapter] = {
    "qwen2_vl": Adapter("qwen2_vl", "Qwen2VLForConditionalGeneration", image_placeholder="<|image_pad|>"),
    "qwen2_5_vl": Adapter("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", image_placeholder="<|image_pad|>"),
    "llava": Adapter("llava", "LlavaForConditionalGeneration"),
    # Pixtral-12B is a LLaVA checkpoint with a Pixtral vision tower: rows of [IMG] closed by [IMG_BREAK]/[IMG_END].
    "pixtral": Adapter(
        "pixtral", "LlavaForConditionalGeneration", extra_image_tokens=("[IMG_BREAK]", "[IMG_END]"), image_placeholder="[IMG]"
    ),
    "mistral3": Adapter(
        "mistral3", "Mistral3ForConditionalGeneration", extra_image_tokens=("[IMG_BREAK]", "[IMG_END]"), image_placeholder="[IMG]"
    ),
    "gemma3": Adapter("gemma3", "Gemma3ForConditionalGeneration", image_placeholder="<start_of_image>"),
}


def family_of(config) -> str:
    """The adapter key for a transformers config; raises for unsupported architectures."""
    family = config.model_type
    if family == "llava" and getattr(config.vision_config, "model_type", None) == "pixtral":
        family = "pixtral"
    if family not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {config.model_type!r} ({getattr(config, 'architectures', None)}); "
            f"supported families: {', '.join(sorted(ADAPTERS))}"
        )
    return family


@dataclass
class VLM:
    """A loaded model: the transformers module, its nnsight wrapper, processor and adapter facts."""

    name: str
    hf_model: torch.nn.Module
    nn: Any  # nnsight wrapper; traces run through it
    processor: Any
    adapter: Adapter
    hub_id: str | None = None
    remote: Any = False
    n_layers: int = field(init=False)
    n_heads: int = field(init=False)
    head_dim: int = field(init=False)
    d_mlp: int = field(init=False)
    image_size: int | None = None  # side of the square images rendered for this model
    image_token_ids: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        tc = operator.attrgetter(self.adapter.text_config)(self.hf_model.config)
        self.n_layers = tc.num_hidden_layers
        self.n_heads = tc.num_attention_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.d_mlp = tc.intermediate_size
        tok = self.tokenizer
        config = self.hf_model.config
        ids = [getattr(config, "image_token_id", None) or config.image_token_index]
        ids += [tok.convert_tokens_to_ids(t) for t in self.adapter.extra_image_tokens]
        self.image_token_ids = tuple(ids)
        if self.image_size is None:
            vision_size = getattr(getattr(self.hf_model.config, "vision_config", None), "image_size", None)
            self.image_size = min(vision_size or 448, 512)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def trace(self, inputs: dict):
        """An nnsight trace of one forward on `inputs` (moved to the model's device), local or remote."""
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        return self.nn.trace(**inputs, remote=self.remote) if self.remote else self.nn.trace(**inputs)

    def layers(self, root=None) -> list:
        """Decoder layers of `root` (default: the nnsight wrapper; pass `hf_model` for plain torch)."""
        return list(operator.attrgetter(self.adapter.layers)(self.nn if root is None else root))

    def attn_out(self, layer):
        """The module whose input holds the per-head outputs, (batch, pos, heads*head_dim)."""
        return operator.attrgetter(self.adapter.attn_out)(layer)

    def mlp_out(self, layer):
        """The module whose input holds the MLP neurons, (batch, pos, d_mlp)."""
        return operator.attrgetter(self.adapter.mlp_out)(layer)

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of image-token positions, same shape as input_ids."""
        return torch.isin(input_ids, torch.tensor(self.image_token_ids, device=input_ids.device))


def wrap(hf_model, processor, *, name: str, hub_id: str | None = None, remote=False, image_size=None) -> VLM:
    """Put an already built transformers VLM and its processor behind nnsight and its adapter."""
    import nnsight

    adapter = ADAPTERS[family_of(hf_model.config)]
    hf_model.eval()
    hf_model.requires_grad_(False)
    return VLM(name, hf_model, nnsight.NNsight(hf_model), processor, adapter, hub_id=hub_id, remote=remote, image_size=image_size)


def load_model(name_or_path: str, *, device=None, dtype=None, device_map=None, remote=False) -> VLM:
    """Load a VLM by short name, hub id or local path ("toy": the embedded default; "tiny-<family>": random test model)."""
    import transformers

    if name_or_path.startswith("tiny-"):
        from .testing import tiny_model

        return tiny_model(name_or_path.removeprefix("tiny-"))
    if name_or_path == "toy":
        from .toy import toy_path

        name_or_path = toy_path()
    hub_id = SHORT_NAMES.get(name_or_path.lower(), name_or_path)
    config = transformers.AutoConfig.from_pretrained(hub_id)
    adapter = ADAPTERS[family_of(config)]
    if remote:
        raise NotImplementedError("remote execution is not available yet")
    model_cls = getattr(transformers, adapter.model_class)
    kwargs = {"dtype": dtype or "auto"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model = model_cls.from_pretrained(hub_id, **kwargs)
    if device is not None and device_map is None:
        hf_model.to(device)
    from .processing import load_processor

    processor = load_processor(hub_id, adapter)
    return wrap(hf_model, processor, name=name_or_path, hub_id=hub_id, remote=remote)
