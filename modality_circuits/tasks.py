"""The tasks as a user names them: the five built-in tasks, their prompts, and `build_pairs` for a model."""
from .data.pairs import Pair, build_pairs
from .data.tasks import MODALITIES, TASKS, Prompt, answer_set, load_image_data, sample_pairs, vocabulary

__all__ = ["MODALITIES", "TASKS", "Pair", "Prompt", "answer_set", "build_pairs", "load_image_data", "sample_pairs",
           "vocabulary"]
