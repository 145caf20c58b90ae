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
from . import experts as _experts
from .adapters import ADAPTERS, ALIASES, Adapter, default_image_size, family_of, layer_heads

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
    n_heads: int = field(init=False)  # the most heads of any layer (Scores pad the others: docs/families-2026.md)
    head_dim: int = field(init=False)  # the widest head of any layer
    d_mlp: int = field(init=False)  # the most neurons of any layer
    layer_heads: tuple[int, ...] = field(init=False)  # heads of each layer
    layer_head_dims: tuple[int, ...] = field(init=False)  # head width of each layer
    layer_neurons: tuple[int, ...] = field(init=False)  # neurons of each layer (E*I in a sparse layer)
    image_size: int | None = None  # side of the square images rendered for this model
    image_token_ids: tuple[int, ...] = field(init=False)
    image_text_ids: tuple[int, ...] = field(init=False)  # tokens of `Adapter.image_text`, allowed inside D
    retries: InitVar[int | None] = None
    retry_backoff: InitVar[float | None] = None
    chunks_per_request: InitVar[int | None] = None
    memory_budget: InitVar[int | str | None] = None
    wording: str = "study"  # prompt wording of the built-in tasks: the study's, or "toy" (docs/method.md section 1)
    weights_id: str | None = None  # fingerprint of the weight files (`weights_fingerprint`); None: built in memory
    settings: Settings = field(init=False)  # built from the five keywords above

    def __post_init__(self, remote, retries, retry_backoff, chunks_per_request, memory_budget):
        given = dict(remote=remote, retries=retries, retry_backoff=retry_backoff,
                     chunks_per_request=chunks_per_request, memory_budget=memory_budget)
        self.settings = Settings(**{k: v for k, v in given.items() if v is not None})
        tc = operator.attrgetter(self.adapter.text_config)(self.hf_model.config)
        self.n_layers = tc.num_hidden_layers
        kinds = layer_heads(self.adapter, tc)  # refuses layer types the package does not know
        own = getattr(tc, "per_layer_config", None)  # transformers' per-layer overrides (Gemma 4's head widths)
        configs = [own[i] if own is not None else tc for i in range(len(kinds))]
        self.layer_heads = tuple(getattr(c, heads) for c, (heads, _) in zip(configs, kinds))
        self.layer_head_dims = tuple(getattr(c, width, None) or c.hidden_size // getattr(c, heads)
                                     for c, (heads, width) in zip(configs, kinds))
        self.head_dim = max(self.layer_head_dims)
        self.n_heads = max(self.layer_heads)
        sparse = any(self.experts_of(layer) is not None for layer in self.layers(self.hf_model))
        if sparse and _remote.is_hosted(self.remote):  # the server's copy has no neuron site (a dense Gemma 4 is fine)
            raise ValueError(f"{self.name}: a hosted mixture-of-experts model has no expert-neuron site on the "
                             "server (docs/families-2026.md); run it here or with remote='local'")
        self.layer_neurons = tuple(self.neuron_site(layer).in_features if self.experts_of(layer) is None
                                   else _experts.n_neurons(self.experts_of(layer)) for layer in self.layers(self.hf_model))
        self.d_mlp = max(self.layer_neurons)
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
        """The module whose INPUT holds the per-head outputs, (batch, pos, heads*head_dim) (per layer kind)."""
        for _, path, _, _ in self.adapter.layer_heads:  # e.g. a linear-attention layer's out_proj
            if hasattr(layer, path.split(".")[0]):
                return operator.attrgetter(path)(layer)
        return operator.attrgetter(self.adapter.head_site)(layer)

    def neuron_site(self, layer):
        """The module whose INPUT holds the MLP neurons, (batch, pos, d_mlp); in a sparse layer the experts'
        `neurons` site, (batch·pos, E·I), unit e·I + j (model/experts.py)."""
        experts = self.experts_of(layer)
        return operator.attrgetter(self.adapter.neuron_site)(layer) if experts is None else experts.neurons

    def experts_of(self, layer):
        """The fused experts module of a sparse layer (`Adapter.experts`), or None."""
        return _experts.experts_at(layer, self.adapter.experts)

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
    if adapter.experts:  # before nnsight wraps the modules: the experts' sited forward (model/experts.py)
        _experts.install_neuron_sites(operator.attrgetter(adapter.layers)(hf_model), adapter.experts)
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
    folder = _local_folder(hub_id)
    weights_id = weights_fingerprint(folder, config) if folder is not None else None  # refuses int-stored weights
    hf_model, info = model_cls.from_pretrained(hub_id, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):  # transformers would run them on random initial values
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{hub_id}: the weight files lack {len(missing)} tensors ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): the model would run on random values; restore them")
    if device is not None and device_map is None:
        hf_model.to(device)
    processor = load_processor(hub_id, adapter)
    model = wrap(hf_model, processor, name=name, hub_id=hub_id, remote=remote, wording=wording)
    model.weights_id = weights_id
    return model


def _local_folder(hub_id: str):
    """The folder holding a checkpoint's files: the path itself, or the hub cache's snapshot (None if neither)."""
    from pathlib import Path

    if Path(hub_id).expanduser().is_dir():
        return Path(hub_id).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=["*.json"]))
    except Exception:  # noqa: BLE001 - not cached (or no hub library): no fingerprint, records keyed on the config
        return None


#: Weight files up to this size are hashed whole by `weights_fingerprint`; larger ones are sampled.
FULL_HASH_BYTES = 256 * 2**20
#: safetensors dtypes of floating-point tensors.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def weights_fingerprint(folder, config) -> str | None:
    """A fast fingerprint of a folder's *.safetensors: names, sizes, JSON headers (every tensor's name, dtype,
    shape and offsets) and the data: all of it for files up to FULL_HASH_BYTES, else 64 blocks of 64 KiB spread
    over it (a retrained or replaced checkpoint changes them; an edit of a few values in a large file may not);
    None without such files.

    Refuses a weight (".weight"/".bias") stored as an integer type in a model without a quantization_config:
    transformers would cast it to floats without a word."""
    import hashlib
    import json
    from pathlib import Path

    files = sorted(Path(folder).glob("*.safetensors"))
    quantised = getattr(config, "quantization_config", None) is not None
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"{f} is not a safetensors file (header of {n} bytes in {size}): restore it")
            header = fh.read(n)
            digest.update(f"{f.name}:{size}:".encode() + header)
            if size <= FULL_HASH_BYTES:  # small files: every byte
                digest.update(fh.read())
            for i in range(64 if size > FULL_HASH_BYTES else 0):  # large ones: 64 blocks spread over the data
                fh.seek(8 + n + (size - 8 - n) * i // 64)
                digest.update(fh.read(65536))
        for name, t in json.loads(header).items():
            if name != "__metadata__" and name.endswith((".weight", ".bias")) and t["dtype"] not in FLOAT_DTYPES \
                    and not quantised:
                raise ValueError(f"{f}: weight {name} is stored as {t['dtype']}, not floating point (and the model has "
                                 "no quantization_config): it would be cast without a word; re-save it as floats")
    return digest.hexdigest() if files else None
