"""A task of your own, in a few lines: name the object a prompt shows (written in words, or drawn).

    modality-circuits reproduce --model toy --task-file examples/shape_naming.py --tasks shape_naming --all-prompts
"""
from modality_circuits.data import render
from modality_circuits.tasks import Task, register

SHAPES = ("ball", "box", "car", "star", "tree")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")


def pair(rng, rows):
    """Modality-free facts of a prompt and its counterfactual: another shape, in any colour."""
    shape, other = rng.sample(SHAPES, 2)
    return {"shape": shape, "colour": rng.choice(COLOURS)}, {"shape": other, "colour": rng.choice(COLOURS)}


register(Task(
    "shape_naming", pair,
    text=lambda m, wording, modality: (f"a {m['colour']} {m['shape']}", "What is this?", m["shape"]),
    image=lambda m, size: render.object_grid([m["shape"]], size, [m["colour"]]),
    answers=lambda: list(SHAPES),
))
