"""modality_circuits: find and compare the circuits VLMs use for a task given as text and as an image."""
from .attribution import attribute
from .circuit import Circuit, Scores
from .models import ADAPTERS, VLM, load_model
from .pairs import Pair, build_pairs
from .patching import exact_patching, faithfulness, faithfulness_curve, position_effect

__all__ = [
    "ADAPTERS", "VLM", "Circuit", "Pair", "Scores", "attribute", "build_pairs", "exact_patching", "faithfulness",
    "faithfulness_curve", "load_model", "position_effect",
]
__version__ = "0.1.0"
