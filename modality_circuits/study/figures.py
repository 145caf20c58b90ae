"""Figures of the study, drawn from the JSON files of the study steps (steps.py); every figure shows its 95 % CIs.

Each function takes the study's model folder (<out>/<model>/) and the tasks, draws with `modality_circuits.plot`
(the same functions a user calls on objects in memory), writes <name>.png and <name>.pdf there, and returns the
PNG path.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import plot  # noqa: E402
from ..circuits.circuit import Circuit, Scores  # noqa: E402
from ..data.pairs import build_pairs, chat_text  # noqa: E402
from ..execution.store import atomic, nan_for_null, read_json  # noqa: E402
from .labels import task_name  # noqa: E402


def _save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        with atomic(folder / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight",  # no timestamp: reruns leave files unchanged
                        metadata={"CreationDate": None} if ext == "pdf" else None)
    plt.close(fig)
    return folder / f"{name}.png"


def gallery(model, folder: Path, tasks, seed: int = 0, *, data_dir=None, image_size: int | None = None,
            to: Path | None = None) -> Path:
    """Each task's textual prompt (as the model sees it, chat template included) beside its framed image prompt,
    from the run's data folder and image size.

    The text is set flush against the image and the unused width is cropped, so long prompts leave no gap."""
    prompts = [[build_pairs(task, m, model, n=1, seed=seed, data_dir=data_dir, image_size=image_size)[0].prompt
                for m in ("text", "image")] for task in tasks]
    texts = [f"{task_name(t)}\n\n{chat_text(model, p)}\n→ answer: {p.answer}" for t, (p, _) in zip(tasks, prompts)]
    chars = max(len(line) for t in texts for line in t.splitlines())
    texts = ["\n".join(line.ljust(chars) for line in t.splitlines()) for t in texts]  # monospace: one left edge
    text_width = 0.08 * min(100, chars)  # inches: 8 pt monospace, with room
    fig, axes = plt.subplots(len(tasks), 2, figsize=(text_width + 2, 2.1 * len(tasks)), squeeze=False,
                             gridspec_kw={"width_ratios": [text_width, 2]})
    for row, text, (_, image) in zip(axes, texts, prompts):
        row[0].axis("off")
        row[0].text(1, 0.5, text, ha="right", multialignment="left", va="center", family="monospace", fontsize=8)
        row[1].imshow(image.image)
        row[1].set_anchor("W")  # flush against the text
        row[1].set_title(f"image prompt → {image.answer}", fontsize=8)
        _frame(row[1])
    fig.suptitle(f"Textual and visual prompts of each task ({model.name})")
    return _save(fig, to or folder, "gallery")


def _frame(ax) -> None:
    """A thin border around an image, no ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(linewidth=0.6, color="0.4")


def _panels(tasks, draw, figsize, **kw):
    """One panel per task, drawn by draw(task, ax); the figure."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(figsize[0] * len(tasks), figsize[1]), squeeze=False, **kw)
    for ax, task in zip(axes[0], tasks):
        draw(task, ax)
    return fig


def position_effect_bars(folder: Path, tasks, *, to: Path | None = None) -> Path:
    """Mean exact effect on the logit difference of patching all components at a position, per span."""
    fig = _panels(tasks, lambda t, ax: plot.position_effect(
        {m: nan_for_null(read_json(folder / t / m / "position_effect.json")) for m in ("text", "image")}, ax=ax,
        title=task_name(t)), (3.2, 3))
    fig.suptitle("Where each modality does its work: effect of patching a whole position, mean per span (95% CI)")
    return _save(fig, to or folder, "position_effect")


def faithfulness_curves(folder: Path, tasks, *, to: Path | None = None) -> Path:
    """Faithfulness of the top-f circuit over f, textual vs visual prompts."""
    fig = _panels(tasks, lambda t, ax: plot.faithfulness(
        {m: nan_for_null(read_json(folder / t / m / "curve.json")) for m in ("text", "image")}, ax=ax,
        title=task_name(t)), (3.2, 3.2), sharey=True)
    fig.suptitle("Faithfulness curves (dotted: smallest circuit with F ≥ the threshold, dashed; band: 95% CI)")
    return _save(fig, to or folder, "faithfulness")


def _records(folder: Path, tasks, name: str) -> dict:
    return {t: nan_for_null(read_json(folder / t / f"{name}.json")) for t in tasks}


def overlap_heatmap(folder: Path, tasks, *, to: Path | None = None) -> Path:
    """nIoU of textual and visual circuits per task and span, annotated with the CI."""
    return _save(plot.overlap(_records(folder, tasks, "overlap")), to or folder, "overlap")


def interchange_bars(folder: Path, tasks, *, to: Path | None = None) -> Path:
    """Interchange score per span and task (1: the swapped-in sub-circuit works like the original, 0: like random)."""
    return _save(plot.interchange(_records(folder, tasks, "interchange")), to or folder, "interchange")


def alignment_lines(folder: Path, tasks, *, to: Path | None = None) -> Path:
    """Per layer (0-based), how text-like the image tokens are."""
    return _save(plot.alignment(_records(folder, tasks, "alignment")), to or folder, "alignment")


def backpatch_bars(folder: Path, tasks, *, to: Path | None = None) -> Path:
    """Accuracy gain (points) from back-patching on visual prompts vs the textual control."""
    return _save(plot.backpatch(_records(folder, tasks, "backpatch")), to or folder, "backpatch")


def example_pair(model, circuit: Circuit, task: str, modality: str, settings: dict, data_dir=None):
    """The first pair built with the study's settings (seed, image size; defaults where a record has none) that has
    the circuit's token layout: the first candidate, or else the first of the study's 3n candidates that fits."""
    for n in (1, 3 * settings.get("n", 48)):
        pairs = build_pairs(task, modality, model, n=n, seed=settings.get("seed", 0),
                            image_size=settings.get("image_size"), data_dir=data_dir,
                            counterfactuals=settings.get("counterfactuals", "random"))
        fit = [p for p in pairs if p.length == circuit.heads.shape[-1] and p.spans == circuit.spans]
        if fit:
            return fit[0]
    raise ValueError(f"no {task}/{modality} prompt has the token layout of the saved circuit ({circuit})")


def load_cell(model, folder: Path, task: str, modality: str, data_dir=None):
    """(circuit, example pair, scores or None) of one task and modality of a study folder: circuit.safetensors,
    an example prompt built with curve.json's settings (seed, image size), and scores.safetensors when present."""
    circuit = Circuit.load(folder / task / modality / "circuit.safetensors", model=model.name)
    settings = read_json(folder / task / modality / "curve.json").get("settings", {})
    path = folder / task / modality / "scores.safetensors"
    scores = Scores.load(path) if path.exists() else None
    return circuit, example_pair(model, circuit, task, modality, settings, data_dir), scores


def circuit_maps(model, folder: Path, tasks, *, data_dir=None, to: Path | None = None) -> Path:
    """Per task and modality, where the circuit sits (`plot.circuit_map`): heads and neurons per layer and token of
    an example prompt, each on its own colour scale (Σ |score| of the circuit's nodes), and the visual prompt's
    image, untinted, with each patch's heads and neurons marked.

    Reads <task>/<modality>/circuit.safetensors, scores.safetensors and the settings of curve.json (seed, image size)
    under `folder`; `data_dir`: the study's, for tasks read from user files.
    """
    cells = {(t, m): load_cell(model, folder, t, m, data_dir) for t in tasks for m in ("text", "image")}
    T = max(c[0].heads.shape[-1] for c in cells.values())
    fig, axes = plt.subplots(2 * len(tasks), 3, figsize=(min(26, 0.24 * T + 8), 3.4 * 2 * len(tasks)),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 1, 0.6]})
    for row, (task, modality) in zip(axes, cells):
        circuit, pair, scores = cells[task, modality]
        plot.circuit_map(circuit, pair, scores, model=model, axes=row)
        if modality == "text":
            row[2].axis("off")
    fig.suptitle(f"Where the circuits sit: heads and neurons per layer and position of an example prompt ({model.name})")
    return _save(fig, to or folder, "circuit_map")


def draw_all(study, tasks, *, to: Path | None = None, prompted=None) -> list[Path]:
    """Every figure of `tasks` from a study's records into `to` (default: the study's folder), with a progress bar
    that moves per figure; the PNG paths. prompted: the tasks whose prompts the gallery and circuit maps may
    build (defined now, recorded with this study's settings; default: all of `tasks`)."""
    from tqdm.auto import tqdm

    folder, prompted = study.dir, tasks if prompted is None else prompted
    jobs = {
        "gallery": lambda: gallery(study.model, folder, prompted, seed=study.seed, data_dir=study.data_dir,
                                   image_size=study.image_size, to=to),
        "circuit_map": lambda: circuit_maps(study.model, folder, prompted, data_dir=study.data_dir, to=to),
        **{draw.__name__: (lambda draw=draw: draw(folder, tasks, to=to)) for draw in (
            position_effect_bars, faithfulness_curves, overlap_heatmap, interchange_bars, alignment_lines,
            backpatch_bars)},
    }
    if not prompted:
        del jobs["gallery"], jobs["circuit_map"]
    paths = []
    bar = tqdm(jobs.items(), desc="figures", total=len(jobs))
    for name, job in bar:
        bar.set_postfix_str(name)
        paths.append(job())
    return paths


def view_folder(model, folder: Path, tasks, *, to: Path | None = None, data_dir=None) -> list[Path]:
    """The interactive viewer (`plot.view`) of each task of a study folder: <to or folder>/<task>.html."""
    from tqdm.auto import tqdm

    paths = []
    for task in tqdm(tasks, desc="viewer pages"):
        cells = [load_cell(model, folder, task, m, data_dir) for m in ("text", "image")]
        paths.append(Path(to or folder) / f"{task}.html")
        Path(paths[-1]).parent.mkdir(parents=True, exist_ok=True)
        plot.view(*cells, paths[-1], model=model, title=f"{task_name(task)}: textual and visual circuits ({model.name})")
    return paths
