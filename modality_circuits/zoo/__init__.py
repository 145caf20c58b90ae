"""Models by name: the embedded toy, the tiny random families of the test zoo, short names of hub checkpoints,
and the model organism with planted circuits (`organism`)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..data.tasks import WORDINGS
from ..execution import remote as _remote
from ..model import VLM, load_pretrained
from .planted import organism  # noqa: F401  (the model organism with planted circuits, docs/validation.md)

#: Short names of the study's three models and of the common instruction-tuned checkpoint of every other family.
SHORT_NAMES = {
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen": "Qwen/Qwen2-VL-7B-Instruct",
    "pixtral-12b": "mistral-community/pixtral-12b",
    "pixtral": "mistral-community/pixtral-12b",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",  # the transformers-format ("-hf") conversion
    "llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "smolvlm2-2.2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",  # model type "smolvlm", served by the idefics3 row
    "aya-vision-8b": "CohereLabs/aya-vision-8b",
    # GLM-4.1V has no instruction-tuned checkpoint without thinking: the Thinking model, answer prefilled.
    "glm-4.1v-9b": "zai-org/GLM-4.1V-9B-Thinking",
    # The 2026 families (docs/families-2026.md): hybrid linear attention, routed experts.
    "qwen3.5-9b": "Qwen/Qwen3.5-9B",
    "qwen3-vl-30b-a3b": "Qwen/Qwen3-VL-30B-A3B-Instruct",
    "glm-4.6v": "zai-org/GLM-4.6V",  # 106B MoE (glm4v_moe_text)
    "glm-4.6v-flash": "zai-org/GLM-4.6V-Flash",  # the small checkpoint of the same family
    # Gemma 4 (hub ids as transformers' gemma4 sources name them; not loaded here): E2B dense with per-layer
    # embeddings and KV-shared layers, 26B-A4B with experts beside the dense MLP.
    "gemma-4-e2b": "google/gemma-4-e2b-it",
    "gemma-4-26b-a4b": "google/gemma-4-26B-A4B-it",
    "gemma-3-12b": "google/gemma-3-12b-it",
    "gemma": "google/gemma-3-12b-it",
    # PaliGemma 2 "mix" (tuned on a task mixture, prompted by task prefix; gated): 448 px, 1024 image tokens.
    "paligemma2-3b": "google/paligemma2-3b-mix-448",
}


def load_model(name_or_path: str, *, device=None, dtype=None, device_map=None, remote=False,
               wording: str | None = None) -> VLM:
    """Load a VLM by short name, hub id or local path ("toy": the embedded default; "tiny-<family>": random test model).

    wording: the prompt wording of the built-in tasks, "study" or "toy" (docs/method.md section 1). Default: "toy"
    for "toy" and the tiny random models (the only words their tokenizers know), else "study"; a folder saved from
    a tiny model (or a copy of the toy's) needs wording="toy".

    remote: False (run here), True (NDIF host from nnsight's configuration / NDIF_HOST), a host URL,
    or "local" (serialisation dry run on the local weights). For True or a URL the API key and the
    host are checked first (RemoteUnavailable), then only the config and processor are loaded.
    """
    if wording is not None and wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; expected one of {WORDINGS}")
    remote = _remote.check(remote)  # before any work: a missing key or a dead host fails here
    if name_or_path.startswith("tiny-"):
        from .tiny import tiny_model

        if _remote.is_hosted(remote):
            raise ValueError(f"{name_or_path} is built in memory, so no server can host it; "
                             "use remote='local' for the serialisation dry run, or save it and serve the folder")
        if name_or_path == "tiny-pixtral-tekken":  # Pixtral-12B's real tokenizer (needs mistral-common)
            from .tekken import tekken_pixtral

            model = tekken_pixtral()
        else:
            model = tiny_model(name_or_path.removeprefix("tiny-"))
        model.wording = wording or model.wording
        return model.with_remote(remote)
    path = name_or_path  # results go to results/<name>/ ("toy" for the embedded model)
    if name_or_path == "toy":
        from .toy import toy_path

        path = toy_path()
    hub_id = SHORT_NAMES.get(path.lower(), path)
    if hub_id == path and not Path(path).expanduser().exists():
        _refuse_missing(path)
    # the embedded model knows the wording it was trained on, and so does a copy (or retraining) of it: its vocabulary
    marker = Path(path).expanduser() / "modality_circuits.json"  # a toy taught a task (study/teach.py): its wording
    if wording is None and marker.is_file():
        wording = json.loads(marker.read_text()).get("wording")
    wording = wording or ("toy" if name_or_path == "toy" or _toy_vocabulary(path) else "study")
    return load_pretrained(hub_id, name=name_or_path, device=device, dtype=dtype, device_map=device_map, remote=remote,
                           wording=wording)


def _toy_vocabulary(path: str) -> bool:
    """Whether the model folder `path` has the toy's own tokenizer (so it reads only the toy's wording)."""
    from .toy import TOY_DIR

    mine, toy = Path(path).expanduser() / "tokenizer.json", TOY_DIR / "tokenizer.json"
    return mine.is_file() and toy.is_file() and mine.read_bytes() == toy.read_bytes()


#: A hub id: "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _refuse_missing(name: str) -> None:
    """A clear error for a name that is neither a short name nor an existing folder, unless it may be a hub id."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise FileNotFoundError(f"model folder {name} does not exist")
    if not _HUB_ID.fullmatch(name):
        raise ValueError(f"unknown model {name!r}: give a short name ({', '.join(SHORT_NAMES)}), 'toy', "
                         "'tiny-<family>', a hub id 'owner/name' or a model folder")
