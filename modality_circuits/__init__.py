"""modality_circuits: find and compare the circuits VLMs use for a task given as text and as an image.

Layers, each importing only those below it: study/ -> analyses/, methods/ -> data/, circuits/ -> model/, execution/
(zoo/ names models: the embedded toy, the tiny test families, hub short names).
"""
from .analyses.alignment import alignment
from .analyses.backpatch import backpatch
from .analyses.interchange import interchange, interchange_both
from .analyses.overlap import overlap
from .circuits.circuit import Circuit, Scores
from .data.pairs import Pair, split
from .methods.ablation import faithfulness, faithfulness_curve, logit_diffs, position_effect
from .methods.attribution import attribute
from .methods.patching import exact_patching
from .methods.predict import keep_correct
from .model import ADAPTERS, VLM
from .tasks import build_pairs
from .zoo import load_model

__all__ = [
    "ADAPTERS", "Circuit", "Pair", "Scores", "VLM", "alignment", "attribute", "backpatch", "build_pairs",
    "exact_patching", "faithfulness", "faithfulness_curve", "interchange", "interchange_both", "keep_correct",
    "load_model", "logit_diffs", "overlap", "position_effect", "split",
]
__version__ = "0.1.0"
