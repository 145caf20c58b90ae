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
from ..circuits.circuit import Circuit  # noqa: E402
from ..data.pairs import SPANS, build_pairs, chat_text, patch_regions  # noqa: E402
from ..execution.store import atomic, nan_for_null, read_json  # noqa: E402
from .labels import SPAN_NAMES, task_name  # noqa: E402
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
    """Grouped bars with CI error bars; series: name -> one CI dict per group. A bar of height zero is drawn
    as a thick tick in its colour on the zero line (a blank would read as missing)."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (name, cis) in enumerate(series.items()):
        vals = [c["value"] for c in cis]
        err = np.array([_err(c) for c in cis]).T
        xs = x + (k - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, vals, width, yerr=err, capsize=3, label=name, color=colors.get(name))
        zero = np.array(vals) == 0
        ax.hlines(np.zeros(zero.sum()), xs[zero] - 0.4 * width, xs[zero] + 0.4 * width,
                  colors=[bars.patches[0].get_facecolor()], lw=4, zorder=3)
    ax.set_xticks(x, groups)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # bars left blank (NaN) must not shift the groups
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", lw=0.6)


def gallery(model, folder: Path, tasks, seed: int = 0, *, data_dir=None, image_size: int | None = None) -> Path:
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
    return _save(fig, folder, "gallery")


def _frame(ax) -> None:
    """A thin border around an image, no ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(linewidth=0.6, color="0.4")


def position_effect_bars(folder: Path, tasks) -> Path:
    """Mean exact effect on the logit difference of patching all components at a position, per span."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        data = {m: nan_for_null(read_json(folder / task / m / "position_effect.json")["per_span"])
                for m in ("text", "image")}
        _bars(ax, list(SPANS), {m: [data[m][s] for s in SPANS] for m in data}, MODALITY_COLORS,
              "Δ logit difference" if ax is axes[0][0] else "")
        ax.set_title(task_name(task))
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
        ax.axhline(c["threshold"], color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("% of heads and neurons kept")
        ax.set_title(task_name(task))
    axes[0][0].set_ylabel("faithfulness F")
    axes[0][0].legend(title="prompt")
    fig.suptitle(f"Faithfulness curves (dotted: smallest circuit with F ≥ {c['threshold']:g}; band: 95% CI)")
    return _save(fig, folder, "faithfulness")


def overlap_heatmap(folder: Path, tasks) -> Path:
    """nIoU of textual and visual circuits per task and span, annotated with the CI."""
    data = {t: nan_for_null(read_json(folder / t / "overlap.json")) for t in tasks}
    vals = np.array([[data[t][s]["niou"]["value"] for s in SPANS] for t in tasks])
    labels = np.array([[f"{data[t][s]['niou']['value']:.2f}\n[{data[t][s]['niou']['low']:.2f}, "
                        f"{data[t][s]['niou']['high']:.2f}]" for s in SPANS] for t in tasks])
    fig, ax = plt.subplots(figsize=(6, 0.7 * len(tasks) + 1.5))
    sns.heatmap(vals, annot=labels, fmt="", cmap="viridis", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "nIoU"},
                xticklabels=[SPAN_NAMES[s] for s in SPANS], yticklabels=[task_name(t) for t in tasks])
    ax.set_title("Overlap of textual and visual circuits (nIoU, 95% CI)")
    return _save(fig, folder, "overlap")


def interchange_bars(folder: Path, tasks) -> Path:
    """Interchange score per span and task (1: the swapped-in sub-circuit works like the original, 0: like random)."""
    data = {t: nan_for_null(read_json(folder / t / "interchange.json")) for t in tasks}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = dict(zip(SPANS, sns.color_palette("Set2", 3)))
    blank = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    _bars(ax, [task_name(t) for t in tasks],
          {s: [data[t][s]["score"] if interchange_readable(data[t][s]) else blank for t in tasks] for s in SPANS}, colors,
          "interchange score")
    ax.axhline(1, color="gray", ls="--", lw=0.8)
    ax.set_ylim(-1.5, 1.6)
    ax.legend(title="swapped span")
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
        ax.plot(x, a["per_layer"], marker="o", color=color, label=task_name(task))
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
    _bars(ax, [task_name(t) for t in tasks],
          {m: [{k: 100 * v for k, v in data[t][m]["gain"].items()} for t in tasks] for m in ("image", "text")},
          MODALITY_COLORS, "accuracy gain (points)")
    ax.legend(title="prompts")
    ax.set_title("Back-patching: gain on the test split, config chosen on a disjoint selection split (95% CI)")
    return _save(fig, folder, "backpatch")


def _node_mass(circuit: Circuit) -> np.ndarray:
    """(L, T) number of circuit nodes (heads + neurons) at each layer and position."""
    return (circuit.heads.sum(1) + circuit.neurons.sum(1)).numpy()


def _patch_mass(mass: np.ndarray, regions: dict, width: int, height: int) -> np.ndarray:
    """(height, width) node mass at each pixel: the sum over the image tokens whose region covers it (one token
    in a plain grid; a tile's and the global view's in tiled layouts). mass: (T,); regions: `patch_regions`."""
    out = np.zeros((height, width))
    for pos, (top, left, bottom, right) in regions.items():
        out[round(top * height):round(bottom * height), round(left * width):round(right * width)] += mass[pos]
    return out


def _example_pair(model, circuit: Circuit, task: str, modality: str, settings: dict, data_dir=None):
    """The first pair built with the study's settings (seed, image size; defaults where a record has none) that has
    the circuit's token layout: the first candidate, or else the first of the study's 3n candidates that fits."""
    for n in (1, 3 * settings.get("n", 48)):
        pairs = build_pairs(task, modality, model, n=n, seed=settings.get("seed", 0),
                            image_size=settings.get("image_size"), data_dir=data_dir)
        fit = [p for p in pairs if p.length == circuit.heads.shape[-1] and p.spans == circuit.spans]
        if fit:
            return fit[0]
    raise ValueError(f"no {task}/{modality} prompt has the token layout of the saved circuit ({circuit})")


def _mass_map(ax, mass: np.ndarray, pair, vmax: float, title: str):
    """Node mass (L, T) as a layers x positions heatmap, the prompt's tokens on the x axis, spans marked."""
    im = ax.imshow(mass, aspect="auto", origin="lower", cmap="Reds", vmin=0, vmax=vmax, interpolation="nearest")
    step = max(1, len(pair.tokens) // 60)  # long prompts: every step-th token
    ax.set_xticks(range(0, len(pair.tokens), step), pair.tokens[::step], rotation=90, fontsize=6)
    ax.set_yticks(range(mass.shape[0]))
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel("layer")
    for span, (start, end) in pair.spans.items():
        ax.axvline(start - 0.5, color="0.3", lw=0.6, ls="--")
        ax.text((start + end - 1) / 2, 1.01, span, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8)
    ax.set_title(title, fontsize=9, pad=12)
    return im


def circuit_maps(model, folder: Path, tasks, *, data_dir=None) -> Path:
    """Per task, where the textual and the visual circuit sit: nodes (heads + neurons) per layer and token of an
    example prompt, and the visual prompt's image with each patch shaded by the circuit's nodes at its token.

    Reads <task>/<modality>/circuit.safetensors and the settings of curve.json (seed, image size) under
    `folder`; `data_dir`: the study's, for tasks read from user files.
    """
    cells = {}  # (task, modality) -> (circuit, (L, T) node mass, example pair)
    for task in tasks:
        for modality in ("text", "image"):
            circuit = Circuit.load(folder / task / modality / "circuit.safetensors", model=model.name)
            settings = read_json(folder / task / modality / "curve.json").get("settings", {})
            cells[task, modality] = circuit, _node_mass(circuit), _example_pair(model, circuit, task, modality,
                                                                                settings, data_dir)
    T = [max(cells[t, m][1].shape[1] for t in tasks) for m in ("text", "image")]  # positions of each map
    width = min(22, 0.12 * sum(T) + 5)  # inches: about 0.12 per token label, and the image
    fig, axes = plt.subplots(len(tasks), 3, figsize=(width, 3.2 * len(tasks)), squeeze=False,
                             gridspec_kw={"width_ratios": [*T, 0.25 * sum(T)]})
    for ax_row, task in zip(axes, tasks):
        vmax = max(1, *(cells[task, m][1].max() for m in ("text", "image")))
        for ax, modality in zip(ax_row, ("text", "image")):
            circuit, mass, pair = cells[task, modality]
            im = _mass_map(ax, mass, pair, vmax,
                           f"{task_name(task)}, {modality}: {circuit.n_heads} heads + {circuit.n_neurons} neurons")
        fig.colorbar(im, ax=ax_row[1], label="nodes", fraction=0.05, pad=0.01)
        _, mass, pair = cells[task, "image"]
        image, ax = pair.prompt.image, ax_row[2]
        ax.imshow(image)
        pixels = _patch_mass(mass.sum(0), patch_regions(model, pair), image.width, image.height)
        shade = ax.imshow(pixels, cmap="Reds", vmin=0, alpha=0.6, interpolation="nearest",
                          extent=(0, image.width, image.height, 0))
        fig.colorbar(shade, ax=ax, label="nodes at its tokens", fraction=0.05, pad=0.02)
        views = "example image; views add up" if model.adapter.patch_grid in ("frames", "base_rows") else "example image"
        ax.set_title(f"visual circuit per image patch\n({views})", fontsize=9)
        _frame(ax)
    fig.suptitle(f"Where the circuits sit: nodes per layer and position, labelled with an example prompt ({model.name})")
    return _save(fig, folder, "circuit_map")
