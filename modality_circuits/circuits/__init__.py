"""Circuits as data: node scores, node sets and their file format, metrics on them, bootstrap intervals."""
from .circuit import Circuit, Scores
from .metrics import expected_iou, faithfulness_value, iou, niou
from .stats import CI, bootstrap

__all__ = ["CI", "Circuit", "Scores", "bootstrap", "expected_iou", "faithfulness_value", "iou", "niou"]
