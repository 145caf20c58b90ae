"""A loaded VLM behind nnsight: sizes, envoys and where its traces run.

`VLM` reads every model fact from its adapter row (model/adapters.py); the algorithms ask
it for decoder layers, head and neuron sites and image tokens, never naming a module path.
Models by name (the toy, the tiny test families, hub short names) are loaded by `modality_circuits.zoo`.
"""
from __future__ import annotations

import dataclasses
import operator
import os
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from ..execution import remote as _remote
from ..execution.settings import NAMES as SETTING_NAMES
from ..execution.settings import Settings
from .adapters import ADAPTERS, ALIASES, Adapter, default_image_size, family_of

#: The pipeline task a hosted VLM is deployed under on NDIF (part of nnsight's model key).
REMOTE_TASK = "image-text-to-text"


@dataclass
class VLM:
    """A loaded model: the transformers module, its nnsight wrapper, processor and adapter facts.

    `settings` (`modality_circuits.execution.settings.Settings`) say where and how traces run: `remote`
    (False here, True NDIF, a host URL, or "local", the serialisation dry run), `retries` and
    `retry_backoff` for dropped connections, `chunks_per_request`, and the `memory_budget` that bounds
    the rows of every forward. Each is a keyword of the constructor (and of `dataclasses.replace`,
    which gives a copy with other settings) and an attribute (assigning one replaces `settings`). With a hosted `remote` `hf_model` is the weightless (meta-device) skeleton
    nnsight builds from the config, `nn` an nnsight TransformersModel named by its hub id, and the
    weights live on the server.
    """

    name: str
    hf_model: torch.nn.Module
    nn: Any  # nnsight wrapper (a RemoteableMixin model); traces run through it
    processor: Any
    adapter: Adapter
    hub_id: str | None = None
    remote: InitVar[Any] = None  # these five (None: the default) make `settings`
    n_layers: int = field(init=False)
    n_heads: int = field(init=False)
    head_dim: int = field(init=False)
    d_mlp: int = field(init=False)
    image_size: int | None = None  # side of the square images rendered for this model
    image_token_ids: tuple[int, ...] = field(init=False)
    image_text_ids: tuple[int, ...] = field(init=False)  # tokens of `Adapter.image_text`, allowed inside D
    retries: InitVar[int | None] = None
    retry_backoff: InitVar[float | None] = None
    chunks_per_request: InitVar[int | None] = None
    memory_budget: InitVar[int | str | None] = None
    wording: str = "study"  # prompt wording of the built-in tasks: the study's, or "toy" (docs/method.md section 1)
    settings: Settings = field(init=False)  # built from the five keywords above

    def __post_init__(self, remote, retries, retry_backoff, chunks_per_request, memory_budget):
        given = dict(remote=remote, retries=retries, retry_backoff=retry_backoff,
                     chunks_per_request=chunks_per_request, memory_budget=memory_budget)
        self.settings = Settings(**{k: v for k, v in given.items() if v is not None})
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
        self.image_text_ids = tuple(i for text in self.adapter.image_text
                                    for i in tok(text, add_special_tokens=False)["input_ids"])
        if self.image_size is None:
            self.image_size = default_image_size(self.adapter, config)
        if self.adapter.injections and self.adapter.layer_returns_tuple:
            raise ValueError("injected visual features are added to a decoder layer's output tensor, not a tuple")

    def __repr__(self) -> str:
        where = "meta (weights on the server)" if self.hosted else str(self.device)
        return (f"VLM({self.name!r}, family {self.adapter.family}, {self.n_layers} layers x {self.n_heads} heads of "
                f"{self.head_dim}, d_mlp {self.d_mlp}, {str(self.dtype).removeprefix('torch.')} on {where}, "
                f"remote={self.remote!r})")

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def text_config(self):
        """The decoder's config (hidden size, vocabulary, ...)."""
        return operator.attrgetter(self.adapter.text_config)(self.hf_model.config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    #: Keyword arguments of every traced forward: only the last position's logits, no KV cache. The index
    #: tensor (not the int 1) makes transformers gather a contiguous (rows, 1, d) copy of the hidden state:
    #: a sliced, strided one sends a frozen lm_head through torch's batched-matmul path, which copies the
    #: weight once per row (measured 65 s vs 0.4 s and +1 GB per row at Qwen2-VL-7B width, bf16, CPU).
    FORWARD = {"logits_to_keep": torch.tensor([-1]), "use_cache": False}

    def decoder_inputs(self, inputs: dict) -> dict:
        """`inputs` without what only the vision tower reads (for forwards whose layer-0 input is given)."""
        return {k: v for k, v in inputs.items() if k not in self.adapter.vision_inputs}

    @property
    def hosted(self) -> bool:
        """Whether the weights live on a server (the local module is a weightless skeleton)."""
        return next(self.hf_model.parameters()).device.type == "meta"

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device, or the CPU when the weights are on a server."""
        device = next(self.hf_model.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device

    def with_remote(self, remote) -> "VLM":
        """This model with another `remote` setting (sharing weights, processor and wrapper where it can).

        False and "local" need the weights here; True or a host URL need the hub id (the pre-flight
        check of `load_model` runs first).
        """
        remote = _remote.check(remote)
        if _remote.is_hosted(remote):
            if self.hosted:
                return dataclasses.replace(self, remote=remote)
            if self.hub_id is None:
                raise ValueError(f"{self.name} was built in memory and has no hub id, so no server can host it; "
                                 "use remote='local' for the serialisation dry run")
            nn = hosted_wrapper(self.hub_id, self.processor)
            return dataclasses.replace(self, hf_model=nn._module, nn=nn, remote=remote)  # `_module`: see hosted_wrapper
        if self.hosted:
            raise ValueError(f"{self.name} was loaded without weights for remote execution; "
                             f"load_model({self.name!r}) loads them to run here")
        return dataclasses.replace(self, remote=remote)

    def backend(self):
        """The nnsight backend of this model's `remote` setting (None: in place)."""
        remote = _remote.normalize(self.remote)
        if _remote.is_hosted(remote) and not self.hosted:
            raise ValueError(f"{self.name} was loaded locally; load_model({self.name!r}, remote=...) or "
                             "model.with_remote(...) names it by hub id for a server")
        if remote == "local" and self.hosted:
            raise ValueError(f"{self.name} has no weights here for remote='local'; load it with load_model(name)")
        return _remote.backend(self.nn, remote)

    def prepare(self, inputs: dict) -> dict:
        """Processor outputs with their tensors on `device` (the CPU for a hosted model: the server moves them)."""
        device = self.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def trace(self, inputs: dict):
        """An nnsight trace of one forward on `inputs`, run where `remote` says (one request when remote)."""
        return self.nn.trace(**self.prepare(inputs), backend=self.backend())

    def session(self):
        """An nnsight session: its traces (written `with model.nn.trace(**inputs)`) go in one request when remote."""
        return self.nn.session(backend=self.backend())

    def call(self, fn, *args, **kwargs):
        """fn(self, *args, **kwargs), retried after a dropped connection when remote (see `remote.call`)."""
        return _remote.call(self, fn, *args, **kwargs)

    def layers(self, root=None) -> list:
        """Decoder layers of `root` (default: the nnsight wrapper; pass `hf_model` for plain torch)."""
        return list(operator.attrgetter(self.adapter.layers)(self.nn if root is None else root))

    def decoder_stack(self, root=None):
        """The module holding the decoder layers (whose forward receives `Adapter.injections`)."""
        return operator.attrgetter(self.adapter.layers.rsplit(".", 1)[0])(self.nn if root is None else root)

    def injects(self, inputs: dict) -> bool:
        """Whether a forward on `inputs` adds visual features after the first decoder layers (`Adapter.injections`)."""
        return bool(self.adapter.injections) and self.adapter.vision_inputs[0] in inputs

    def head_site(self, layer):
        """The module whose INPUT holds the per-head outputs, (batch, pos, heads*head_dim)."""
        return operator.attrgetter(self.adapter.head_site)(layer)

    def neuron_site(self, layer):
        """The module whose INPUT holds the MLP neurons, (batch, pos, d_mlp)."""
        return operator.attrgetter(self.adapter.neuron_site)(layer)

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of image-token positions, same shape as input_ids."""
        return torch.isin(input_ids, torch.tensor(self.image_token_ids, device=input_ids.device))


def local_wrapper(hf_model):
    """nnsight's remoteable wrapper around loaded weights: traces run here, or through the dry run.

    A plain nnsight `Remotable` over the module (an nnsight class, so a serialised request names
    nothing of this package): the same module tree and envoy paths as `NNsight(hf_model)`.
    """
    from nnsight.modeling.mixins.remotable import Remotable

    return Remotable(hf_model)


def hosted_wrapper(hub_id: str, processor):
    """nnsight's TransformersModel for `hub_id`, built on the meta device (no weights), keyed for NDIF.

    The module tree is the checkpoint's own transformers class (AutoModelForImageTextToText maps every
    supported family to the class of `ADAPTERS`), so envoy paths match the local wrapper's. The
    processor is handed over so nothing else is fetched. A local folder (or an offline hub) keeps its
    id as given instead of being canonicalised through the Hub. Its `_module` (private nnsight, checked
    against 0.8.1) is the meta-device transformers module the wrapper traces: our `hf_model` skeleton.
    """
    from nnsight.modeling import huggingface
    from nnsight.modeling.transformers import TransformersModel

    if os.path.isdir(hub_id) or os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        # private nnsight internal (checked against nnsight 0.8.1): the cache of canonical hub ids;
        # seeding it stops nnsight from asking the Hub to canonicalise a local or offline id.
        huggingface._ID_CACHE.setdefault(hub_id, hub_id)
    return TransformersModel(hub_id, task=REMOTE_TASK, processor=processor)


def _setting(name: str) -> property:
    """`VLM.<name>`: that field of `VLM.settings`; assigning it replaces the settings."""
    def get(self):
        return getattr(self.settings, name)

    def set_(self, value):
        self.settings = self.settings.replace(**{name: value})
    return property(get, set_, doc=f"`settings.{name}` (assigning it replaces `settings`).")


for _name in SETTING_NAMES:  # after @dataclass: the constructor keeps its keywords, and dataclasses.replace reads these
    setattr(VLM, _name, _setting(_name))


def wrap(hf_model, processor, *, name: str, hub_id: str | None = None, remote=False, image_size=None,
         wording: str = "study") -> VLM:
    """Put an already built transformers VLM and its processor behind nnsight and its adapter."""
    adapter = ADAPTERS[family_of(hf_model.config)]
    hf_model.eval()
    hf_model.requires_grad_(False)
    return VLM(name, hf_model, local_wrapper(hf_model), processor, adapter, hub_id=hub_id, remote=remote,
               image_size=image_size, wording=wording)


def load_pretrained(hub_id: str, *, name: str, device=None, dtype=None, device_map=None, remote=False,
                    wording: str = "study") -> VLM:
    """Load a checkpoint (hub id or folder) of a supported family; `remote` is already checked.

    With a hosted `remote` only the config and processor are loaded (the weights stay on the server).
    """
    import transformers

    from .processing import load_processor

    config = transformers.AutoConfig.from_pretrained(hub_id)
    adapter = ADAPTERS[family_of(config)]
    if _remote.is_hosted(remote):
        processor = load_processor(hub_id, adapter)
        nn = hosted_wrapper(hub_id, processor)
        return VLM(name, nn._module, nn, processor, adapter, hub_id=hub_id, remote=remote, wording=wording)
    model_cls = getattr(transformers, config.architectures[0] if config.model_type in ALIASES else adapter.model_class)
    kwargs = {"dtype": dtype or "auto"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model = model_cls.from_pretrained(hub_id, **kwargs)
    if device is not None and device_map is None:
        hf_model.to(device)
    processor = load_processor(hub_id, adapter)
    return wrap(hf_model, processor, name=name, hub_id=hub_id, remote=remote, wording=wording)
