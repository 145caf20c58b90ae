"""Public test helpers: tiny random-weight models of every supported family (see `modality_circuits.zoo.tiny`)."""
from .zoo.tiny import FAMILIES, tiny_model

__all__ = ["FAMILIES", "tiny_model"]
