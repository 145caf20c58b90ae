"""How the figures and the report name tasks and spans."""

SPAN_NAMES = {"D": "D (data)", "Q": "Q (query)", "G": "G (generation)"}
TASK_NAMES = {"counting": "counting", "arithmetic": "arithmetic", "color_ordering": "colour ordering",
              "factual_recall": "factual recall", "sentiment": "sentiment"}


def task_name(task: str) -> str:
    """How a task is named in figures and the report (a registered task: its name with spaces)."""
    return TASK_NAMES.get(task, task.replace("_", " "))
