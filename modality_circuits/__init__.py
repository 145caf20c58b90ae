"""modality_circuits: find and compare the circuits VLMs use for a task given as text and as an image."""
from .models import ADAPTERS, VLM, load_model

__all__ = ["ADAPTERS", "VLM", "load_model"]
__version__ = "0.1.0"
