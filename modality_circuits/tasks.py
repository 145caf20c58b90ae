"""The tasks as a user names them: the built-in tasks, your own (`Task`, `register`), their prompts, `build_pairs`."""
from .data.pairs import Pair, build_pairs
from .data.tasks import (
    MODALITIES,
    REGISTRY,
    TASKS,
    WORDINGS,
    Prompt,
    Task,
    answer_set,
    get_task,
    load_image_data,
    load_task_file,
    register,
    sample_pairs,
    vocabulary,
)

__all__ = ["MODALITIES", "REGISTRY", "TASKS", "WORDINGS", "Pair", "Prompt", "Task", "answer_set", "build_pairs",
           "get_task", "load_image_data", "load_task_file", "register", "sample_pairs", "vocabulary"]
