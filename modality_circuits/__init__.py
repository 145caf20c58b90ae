"""modality_circuits: find and compare the circuits VLMs use for a task given as text and as an image.

Layers, each importing only those below it: study/ -> analyses/, methods/ -> data/, circuits/ -> model/, execution/
(zoo/ names models: the embedded toy, the tiny test families, hub short names; plot draws every figure from objects).

The names below are imported on first use (module `__getattr__`), so `import modality_circuits` loads neither
torch, transformers, nnsight nor matplotlib (experiments/bench_import.py measures it).
"""
import os
from importlib import import_module

# MKL's strict conditional numerical reproducibility: matrix products give the same bits for any number of threads
# (and on any AVX2 x86 CPU). Read when MKL first runs, so it holds if this package is imported before torch does
# any matrix work; a value the user set wins. Measured cost on the toy: none (docs/reproducibility.md).
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

#: public name -> the module (relative to this package) that defines it.
_LAZY = {
    "alignment": ".analyses.alignment", "backpatch": ".analyses.backpatch", "interchange": ".analyses.interchange",
    "interchange_both": ".analyses.interchange", "overlap": ".analyses.overlap", "Circuit": ".circuits.circuit",
    "Scores": ".circuits.circuit", "Pair": ".data.pairs", "split": ".data.pairs", "faithfulness": ".methods.ablation",
    "faithfulness_curve": ".methods.ablation", "logit_diffs": ".methods.ablation", "position_effect": ".methods.ablation",
    "attribute": ".methods.attribution", "exact_patching": ".methods.patching", "keep_correct": ".methods.predict",
    "ADAPTERS": ".model", "VLM": ".model", "build_pairs": ".tasks", "load_model": ".zoo",
}
#: subpackages and modules reachable as attributes (`mc.plot`, `mc.tasks.load_task_file`), imported on first use.
_SUBMODULES = ("analyses", "circuits", "data", "execution", "methods", "model", "plot", "study", "tasks", "testing",
               "viewer", "zoo")

__all__ = [*_LAZY, "plot"]  # noqa: PLE0604 - the lazy names, defined once above
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_LAZY, *_SUBMODULES])
