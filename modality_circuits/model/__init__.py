"""The model layer: the adapter table of family facts, the VLM wrapper, loading, and the torchvision-free processor."""
from .adapters import ADAPTERS, Adapter, family_of
from .vlm import VLM, load_pretrained, wrap

__all__ = ["ADAPTERS", "VLM", "Adapter", "family_of", "load_pretrained", "wrap"]
