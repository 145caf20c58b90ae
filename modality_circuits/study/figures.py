"""Figures of the study, drawn from the JSON files of the study steps (steps.py); every figure shows its 95 % CIs.

Each function takes the study's model folder (<out>/<model>/) and the tasks, writes <name>.png
and <name>.pdf there, and returns the PNG path.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from ..analyses.interchange import MIN_MARGIN  # noqa: E402
from ..data.pairs import SPANS, build_pairs, chat_text  # noqa: E402
from ..execution.store import atomic, nan_for_null, read_json  # noqa: E402
from .labels import SPAN_NAMES, TASK_NAMES  # noqa: E402
from .steps import interchange_readable  # noqa: E402

MODALITY_COLORS = {"text": "#1f77b4", "image": "#d62728"}


def _save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        with atomic(folder / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight",  # no timestamp: reruns leave files unchanged
                        metadata={"CreationDate": None} if ext == "pdf" else None)
    plt.close(fig)
    return folder / f"{name}.png"


def _err(ci: dict) -> tuple[float, float]:
    """Distances from the value to the CI bounds (for matplotlib error bars)."""
    return max(ci["value"] - ci["low"], 0.0), max(ci["high"] - ci["value"], 0.0)


def _bars(ax, groups: list[str], series: dict[str, list[dict]], colors: dict, ylabel: str) -> None:
    """Grouped bars with CI error bars; series: name -> one CI dict per group."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (name, cis) in enumerate(series.items()):
        vals = [c["value"] for c in cis]
        err = np.array([_err(c) for c in cis]).T
        ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=name,
               color=colors.get(name))
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", lw=0.6)


def gallery(model, folder: Path, tasks, seed: int = 0) -> Path:
    """Each task's textual prompt (as the model sees it, chat template included) beside its image prompt."""
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 2.3 * len(tasks)), gridspec_kw={"width_ratios": [3, 1]})
    axes = np.atleast_2d(axes)
    for row, task in zip(axes, tasks):
        text = build_pairs(task, "text", model, n=1, seed=seed)[0]
        image = build_pairs(task, "image", model, n=1, seed=seed)[0]
        row[0].axis("off")
        row[0].text(0, 0.5, f"{TASK_NAMES[task]}\n\n{chat_text(model, text.prompt)}\n→ answer: {text.prompt.answer}",
                    va="center", family="monospace", fontsize=8, wrap=True)
        row[1].imshow(image.prompt.image)
        row[1].set_title(f"image prompt → {image.prompt.answer}", fontsize=8)
        row[1].axis("off")
    fig.suptitle(f"Textual and visual prompts of each task ({model.name})")
    return _save(fig, folder, "gallery")


def position_effect_bars(folder: Path, tasks) -> Path:
    """Mean exact effect on the logit difference of patching all components at a position, per span."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        data = {m: nan_for_null(read_json(folder / task / m / "position_effect.json")["per_span"])
                for m in ("text", "image")}
        _bars(ax, list(SPANS), {m: [data[m][s] for s in SPANS] for m in data}, MODALITY_COLORS,
              "Δ logit difference" if ax is axes[0][0] else "")
        ax.set_title(TASK_NAMES[task])
    axes[0][0].legend(title="prompt")
    fig.suptitle("Where each modality does its work: effect of patching a whole position, mean per span (95% CI)")
    return _save(fig, folder, "position_effect")


def faithfulness_curves(folder: Path, tasks) -> Path:
    """Faithfulness of the top-f circuit over f, textual vs visual prompts."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        for m, color in MODALITY_COLORS.items():
            c = read_json(folder / task / m / "curve.json")
            x = np.array(c["fractions"]) * 100
            ax.plot(x, nan_for_null(c["faithfulness"]), color=color, label=m, marker=".", ms=3)
            ci = nan_for_null(c["ci"])
            ax.fill_between(x, [b["low"] for b in ci], [b["high"] for b in ci], color=color, alpha=0.2)
            if c["minimal_fraction"] is not None:
                ax.axvline(c["minimal_fraction"] * 100, color=color, ls=":", lw=1)
        ax.axhline(0.8, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("% of heads and neurons kept")
        ax.set_title(TASK_NAMES[task])
    axes[0][0].set_ylabel("faithfulness F")
    axes[0][0].legend(title="prompt")
    fig.suptitle("Faithfulness curves (dotted: smallest circuit with F ≥ 0.8; band: 95% CI)")
    return _save(fig, folder, "faithfulness")


def overlap_heatmap(folder: Path, tasks) -> Path:
    """nIoU of textual and visual circuits per task and span, annotated with the CI."""
    data = {t: nan_for_null(read_json(folder / t / "overlap.json")) for t in tasks}
    vals = np.array([[data[t][s]["niou"]["value"] for s in SPANS] for t in tasks])
    labels = np.array([[f"{data[t][s]['niou']['value']:.2f}\n[{data[t][s]['niou']['low']:.2f}, "
                        f"{data[t][s]['niou']['high']:.2f}]" for s in SPANS] for t in tasks])
    fig, ax = plt.subplots(figsize=(6, 0.7 * len(tasks) + 1.5))
    sns.heatmap(vals, annot=labels, fmt="", cmap="viridis", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "nIoU"},
                xticklabels=[SPAN_NAMES[s] for s in SPANS], yticklabels=[TASK_NAMES[t] for t in tasks])
    ax.set_title("Overlap of textual and visual circuits (nIoU, 95% CI)")
    return _save(fig, folder, "overlap")


def interchange_bars(folder: Path, tasks) -> Path:
    """Interchange score per span and task (1: the swapped-in sub-circuit works like the original, 0: like random)."""
    data = {t: nan_for_null(read_json(folder / t / "interchange.json")) for t in tasks}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = dict(zip(SPANS, sns.color_palette("Set2", 3)))
    blank = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    _bars(ax, [TASK_NAMES[t] for t in tasks],
          {s: [data[t][s]["score"] if interchange_readable(data[t][s]) else blank for t in tasks] for s in SPANS}, colors,
          "interchange score")
    ax.axhline(1, color="gray", ls="--", lw=0.8)
    ax.set_ylim(-1.5, 1.6)
    ax.legend(title="swapped span", fontsize=8)
    ax.set_title("Cross-modal interchange, mean of both directions (95% CI)\n"
                 "1 = works like the original sub-circuit, 0 = like a random one; axis cut at ±1.5;\n"
                 f"blank = not interpretable (original sub-circuit < {MIN_MARGIN} F above random)", fontsize=9)
    return _save(fig, folder, "interchange")


def alignment_lines(folder: Path, tasks) -> Path:
    """Per layer, how text-like the image tokens are."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task, color in zip(tasks, sns.color_palette("tab10", len(tasks))):
        a = nan_for_null(read_json(folder / task / "alignment.json"))
        x = np.arange(1, len(a["per_layer"]) + 1)
        ax.plot(x, a["per_layer"], marker="o", color=color, label=TASK_NAMES[task])
        ax.fill_between(x, [c["low"] for c in a["ci"]], [c["high"] for c in a["ci"]], color=color, alpha=0.15)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max cosine similarity to text data tokens")
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    ax.set_title("Image-token residuals become text-like with depth? (95% CI)")
    return _save(fig, folder, "alignment")


def backpatch_bars(folder: Path, tasks) -> Path:
    """Accuracy gain from back-patching on visual prompts vs the textual control."""
    data = {t: nan_for_null(read_json(folder / t / "backpatch.json")) for t in tasks}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _bars(ax, [TASK_NAMES[t] for t in tasks],
          {m: [{k: 100 * v for k, v in data[t][m]["gain"].items()} for t in tasks] for m in ("image", "text")},
          MODALITY_COLORS, "accuracy gain (points)")
    ax.legend(title="prompts")
    ax.set_title("Back-patching: gain on the test split, config chosen on a disjoint selection split (95% CI)")
    return _save(fig, folder, "backpatch")
