"""Every figure of the study as a function of objects in memory, returning a matplotlib Figure.

Each function takes what the API returns (`Curve`, `overlap(...)`'s dict, `CrossInterchange`, `Alignment`,
`Backpatch`, `PositionEffect`, `Circuit` + `Pair` + `Scores`) or the same result as the study's JSON record
(curve.json, overlap.json, ...), one of them or a dict {label: one} (labels: modalities or tasks) to compare.
`ax=` draws into an existing Axes (the figure is then that Axes' figure). Units: faithfulness and nIoU as
fractions, accuracy gains in points, layers 0-based. Intervals are drawn when the input has them (records, CIs).

    fig = plot.faithfulness({"text": curve_text, "image": curve_image}); fig.savefig("curve.png")
"""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from .data.pairs import SPANS
from .study.labels import SPAN_NAMES, task_name

MODALITY_COLORS = {"text": "#1f77b4", "image": "#d62728"}
HEAD_CMAP, NEURON_CMAP = "Blues", "Oranges"
NAN = float("nan")


def _axes(ax, figsize):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _ci(x) -> dict:
    """{"value", "low", "high"} of a CI, a CI record or a bare number (no interval: low = high = value); None -> NaN."""
    if x is None:
        return {"value": NAN, "low": NAN, "high": NAN}
    if isinstance(x, dict):
        return {k: NAN if x[k] is None else float(x[k]) for k in ("value", "low", "high")}
    if hasattr(x, "low"):
        return {"value": float(x.value), "low": float(x.low), "high": float(x.high)}
    return {"value": float(x), "low": float(x), "high": float(x)}


def _many(obj, single) -> dict:
    """{label: one result}: `obj` itself when single(obj) says it is one result (under the label ""), else obj."""
    return {"": obj} if single(obj) else dict(obj)


def _color(label: str, k: int):
    return MODALITY_COLORS.get(label, plt.get_cmap("tab10")(k % 10))


def _bars(ax, groups: list[str], series: dict[str, list[dict]], ylabel: str, colors=None) -> None:
    """Grouped bars with CI error bars; series: name -> one CI dict per group. A bar of height zero is drawn
    as a thick tick in its colour on the zero line (a blank would read as missing)."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (name, cis) in enumerate(series.items()):
        vals = np.array([c["value"] for c in cis])
        err = np.array([[max(c["value"] - c["low"], 0.0), max(c["high"] - c["value"], 0.0)] for c in cis]).T
        xs = x + (k - (len(series) - 1) / 2) * width
        color = (colors or {}).get(name, _color(name, k))
        ax.bar(xs, vals, width, yerr=np.nan_to_num(err), capsize=3, label=name or None, color=color)
        zero = vals == 0
        ax.hlines(np.zeros(zero.sum()), xs[zero] - 0.4 * width, xs[zero] + 0.4 * width, colors=[color], lw=4, zorder=3)
    ax.set_xticks(x, groups)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # bars left blank (NaN) must not shift the groups
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", lw=0.6)


def faithfulness(curves, *, ax=None, title: str | None = None):
    """Faithfulness F over the fraction of heads and neurons kept (log axis), the threshold and the smallest
    faithful fraction (dotted). curves: a `Curve` or curve.json record, or {label: one}."""
    curves = _many(curves, lambda c: hasattr(c, "fractions") or (isinstance(c, dict) and "fractions" in c))
    fig, ax = _axes(ax, (4, 3.2))
    threshold = None
    for k, (label, c) in enumerate(curves.items()):
        get = c.get if isinstance(c, dict) else lambda name, c=c: getattr(c, name, None)
        x = np.array(get("fractions")) * 100
        color = _color(label, k)
        ax.plot(x, [_ci(v)["value"] for v in (get("faithfulness") or get("values"))], color=color, label=label or None,
                marker=".", ms=3)
        if get("ci"):
            cis = [_ci(v) for v in get("ci")]
            ax.fill_between(x, [b["low"] for b in cis], [b["high"] for b in cis], color=color, alpha=0.2)
        if get("minimal_fraction") is not None:
            ax.axvline(get("minimal_fraction") * 100, color=color, ls=":", lw=1)
        threshold = get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("% of heads and neurons kept")
    ax.set_ylabel("faithfulness F")
    if any(curves):
        ax.legend(title="prompt", fontsize=8)
    ax.set_title(title or f"Faithfulness (dotted: smallest circuit with F ≥ {threshold})", fontsize=9)
    return fig


def _niou(span_result) -> dict:
    """The span's nIoU as a CI dict: an overlap.json span record, or a `SpanOverlap` (no interval)."""
    return _ci(span_result["niou"] if isinstance(span_result, dict) else span_result.niou)


def overlap(results, *, ax=None, title: str | None = None):
    """nIoU of the textual and visual circuits per span (heatmap; rows: tasks). results: `overlap(text, image)`'s
    {span: SpanOverlap} or an overlap.json record, or {task: one}."""
    results = _many(results, lambda r: "D" in r)
    vals = np.array([[_niou(r[s])["value"] for s in SPANS] for r in results.values()])
    fig, ax = _axes(ax, (6, 0.7 * len(results) + 1.5))
    im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, r in enumerate(results.values()):
        for j, s in enumerate(SPANS):
            c = _niou(r[s])
            text = f"{c['value']:.2f}" + (f"\n[{c['low']:.2f}, {c['high']:.2f}]" if c["low"] != c["high"] else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if c["value"] < 0.6 else "black")
    ax.set_xticks(range(len(SPANS)), [SPAN_NAMES[s] for s in SPANS])
    ax.set_yticks(range(len(results)), [task_name(t) if t else "" for t in results])
    fig.colorbar(im, ax=ax, label="nIoU")
    ax.set_title(title or "Overlap of textual and visual circuits (nIoU, 95% CI)", fontsize=9)
    return fig


def _interchange_score(r) -> dict:
    """A span's two-direction score as a CI dict, NaN when it cannot be read (a margin below MIN_MARGIN)."""
    if isinstance(r, dict):
        from .study.steps import interchange_readable

        return _ci(r["score"]) if interchange_readable(r) else _ci(None)
    return _ci(r.score) if r.interpretable else _ci(None)


def interchange(results, *, ax=None, title: str | None = None):
    """Interchange score per span (1: the swapped-in sub-circuit works like the original, 0: like a random one;
    blank: not interpretable). results: {span: CrossInterchange} or an interchange.json record, or {task: one}."""
    from .analyses.interchange import MIN_MARGIN

    results = _many(results, lambda r: "D" in r)
    fig, ax = _axes(ax, (1.4 * len(results) + 3, 3.2))
    colors = dict(zip(SPANS, plt.get_cmap("Set2").colors))
    _bars(ax, [task_name(t) if t else "" for t in results],
          {s: [_interchange_score(r[s]) for r in results.values()] for s in SPANS if all(s in r for r in
                                                                                          results.values())},
          "interchange score", colors)
    ax.axhline(1, color="gray", ls="--", lw=0.8)
    ax.set_ylim(-1.5, 1.6)
    ax.legend(title="swapped span", fontsize=8)
    ax.set_title(title or "Cross-modal interchange, mean of both directions (95% CI)\n1 = like the original "
                 f"sub-circuit, 0 = like a random one; axis cut at ±1.5;\nblank = not interpretable (original "
                 f"sub-circuit < {MIN_MARGIN} F above random)", fontsize=9)
    return fig


def alignment(results, *, ax=None, title: str | None = None):
    """Per decoder layer (0-based), the max cosine similarity of image-token residuals to the text data tokens.
    results: an `Alignment` or alignment.json record, or {task: one}."""
    results = _many(results, lambda r: hasattr(r, "per_layer") or (isinstance(r, dict) and "per_layer" in r))
    fig, ax = _axes(ax, (6, 3.5))
    x = np.arange(0)
    for k, (label, a) in enumerate(results.items()):
        per_layer = [_ci(v)["value"] for v in (a["per_layer"] if isinstance(a, dict) else a.per_layer.tolist())]
        cis = [_ci(c) for c in (a["ci"] if isinstance(a, dict) else a.ci)]
        x = np.arange(len(per_layer))
        color = _color(label, k)
        ax.plot(x, per_layer, marker="o", color=color, label=task_name(label) if label else None)
        ax.fill_between(x, [c["low"] for c in cis], [c["high"] for c in cis], color=color, alpha=0.15)
    ax.set_xlabel("decoder layer (0-based)")
    ax.set_ylabel("max cosine similarity to text data tokens")
    ax.set_xticks(x)
    if any(results):
        ax.legend(fontsize=8)
    ax.set_title(title or "Image-token residuals become text-like with depth? (95% CI)", fontsize=9)
    return fig


def _gain(r) -> dict:
    """A back-patching gain in points as a CI dict: a `Backpatch` or a backpatch.json modality record."""
    return _ci(r["gain_points"] if isinstance(r, dict) else r.gain)


def backpatch(results, *, ax=None, title: str | None = None):
    """Accuracy gain (points) of back-patching on visual prompts and on the textual control. results:
    {"image": Backpatch, "text": Backpatch} or a backpatch.json record, or {task: one}."""
    results = _many(results, lambda r: "image" in r or "text" in r)
    fig, ax = _axes(ax, (1.4 * len(results) + 3, 3.2))
    modalities = [m for m in ("image", "text") if all(m in r for r in results.values())]
    _bars(ax, [task_name(t) if t else "" for t in results],
          {m: [_gain(r[m]) for r in results.values()] for m in modalities}, "accuracy gain (points)", MODALITY_COLORS)
    ax.legend(title="prompts", fontsize=8)
    ax.set_title(title or "Back-patching: gain on the test split, config chosen on a disjoint selection split "
                 "(95% CI)", fontsize=9)
    return fig


def _per_span(effect, span: str) -> dict:
    """A span's mean position effect as a CI dict: a `PositionEffect` or a position_effect.json record."""
    per_span = effect["per_span"] if isinstance(effect, dict) else effect.per_span
    return _ci(per_span.get(span))


def position_effect(effects, *, ax=None, title: str | None = None):
    """Mean effect on the logit difference of patching all components at a position, per span D/Q/G.
    effects: {"text": PositionEffect, "image": PositionEffect} or position_effect.json records, or one of them."""
    effects = _many(effects, lambda e: hasattr(e, "per_span") or (isinstance(e, dict) and "per_span" in e))
    fig, ax = _axes(ax, (3.2, 3))
    _bars(ax, list(SPANS), {m: [_per_span(e, s) for s in SPANS] for m, e in effects.items()}, "Δ logit difference",
          MODALITY_COLORS)
    if any(effects):
        ax.legend(title="prompt", fontsize=8)
    ax.set_title(title or "Effect of patching a whole position, mean per span", fontsize=9)
    return fig


def _node_maps(circuit, scores) -> tuple[np.ndarray, np.ndarray, str]:
    """(L, T) head and neuron maps of a circuit: summed |score| of its nodes (with scores), else node counts."""
    if scores is None:
        return circuit.heads.sum(1).numpy(), circuit.neurons.sum(1).numpy(), "nodes"
    if (scores.heads.shape, scores.neurons.shape) != (circuit.heads.shape, circuit.neurons.shape):
        raise ValueError(f"scores of layout {tuple(scores.heads.shape)} do not fit the circuit's "
                         f"{tuple(circuit.heads.shape)}")
    return ((scores.heads.abs() * circuit.heads).sum(1).numpy(), (scores.neurons.abs() * circuit.neurons).sum(1).numpy(),
            "Σ |score|")


def _map(ax, values: np.ndarray, pair, cmap: str, label: str, title: str) -> None:
    """values (L, T) as a layers x positions heatmap with its own colour bar; tokens on the x axis, spans marked."""
    im = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, vmin=0, vmax=max(values.max(), 1e-12),
                   interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, label=label, fraction=0.05, pad=0.01)
    step = max(1, len(pair.tokens) // 60)  # long prompts: every step-th token
    ax.set_xticks(range(0, len(pair.tokens), step), pair.tokens[::step], rotation=90, fontsize=6)
    ax.set_yticks(range(values.shape[0]))
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel("layer")
    for span, (start, end) in pair.spans.items():
        ax.axvline(start - 0.5, color="0.3", lw=0.6, ls="--")
        ax.text((start + end - 1) / 2, 1.01, span, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8)
    ax.set_title(title, fontsize=9, pad=12)


def _regions(pair, model) -> dict:
    """{position: (top, left, bottom, right)} as fractions of the image: `patch_regions` with a model (tiled
    layouts), else the pair's own patch grid."""
    if model is not None:
        from .data.pairs import patch_regions

        return patch_regions(model, pair)
    rows, cols, where = pair.grid
    return {pos: (r / rows, c / cols, (r + 1) / rows, (c + 1) / cols) for pos, (r, c) in where.items()}


def _image_marks(ax, pair, heads: np.ndarray, neurons: np.ndarray, regions: dict) -> None:
    """The prompt's image, untinted, with each patch token's circuit nodes as marks on its region: a disc
    (heads, HEAD_CMAP) and a frame (neurons, NEURON_CMAP), each on its own scale; heads, neurons: (T,)."""
    image = pair.prompt.image
    w, h = image.width, image.height
    ax.imshow(image, extent=(0, w, h, 0))
    norms = [matplotlib.colors.Normalize(0, max(v.max(), 1e-12)) for v in (heads, neurons)]
    cmaps = [plt.get_cmap(HEAD_CMAP), plt.get_cmap(NEURON_CMAP)]
    for pos, (top, left, bottom, right) in regions.items():
        x0, y0, x1, y1 = left * w, top * h, right * w, bottom * h
        if neurons[pos] > 0:
            ax.add_patch(matplotlib.patches.Rectangle((x0 + 1, y0 + 1), x1 - x0 - 2, y1 - y0 - 2, fill=False, lw=2,
                                                      edgecolor=cmaps[1](0.3 + 0.7 * norms[1](neurons[pos]))))
        if heads[pos] > 0:
            ax.add_patch(matplotlib.patches.Circle(((x0 + x1) / 2, (y0 + y1) / 2), min(x1 - x0, y1 - y0) / 5,
                                                   facecolor=cmaps[0](0.3 + 0.7 * norms[0](heads[pos])),
                                                   edgecolor="black", lw=0.5))
    for k, (norm, cmap, label) in enumerate(zip(norms, cmaps, ("heads (disc)", "neurons (frame)"))):
        bar = ax.figure.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), cax=ax.inset_axes([1.04 + 0.42 * k, 0, 0.06, 1]))
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def circuit_map(circuit, pair, scores=None, *, model=None, axes=None, title: str | None = None):
    """Where a circuit sits: heads and neurons per layer and token of `pair` (two heatmaps, each on its own colour
    scale: Σ |score| with `scores`, else node counts), and for an image prompt its image, untinted, with each patch's
    heads (disc) and neurons (frame) marked. model: for tiled layouts' patch regions (`patch_regions`).
    axes: 2 (text) or 3 (image) Axes to draw into."""
    circuit.check_match(pair, "pair")
    heads, neurons, label = _node_maps(circuit, scores)
    is_image = bool(pair.grid[2])
    if axes is None:
        T = heads.shape[1]
        ratios = [T, T] + ([0.5 * T] if is_image else [])
        fig, axes = plt.subplots(1, len(ratios), figsize=(min(24, 0.12 * sum(ratios) + 6), 3.4), layout="constrained",
                                 gridspec_kw={"width_ratios": ratios})
    fig = axes[0].figure
    what = f"{circuit.task}/{circuit.modality}" if getattr(circuit, "task", None) else pair.prompt.modality
    _map(axes[0], heads, pair, HEAD_CMAP, f"heads: {label}", f"{what}: {circuit.n_heads} heads")
    _map(axes[1], neurons, pair, NEURON_CMAP, f"neurons: {label}", f"{what}: {circuit.n_neurons} neurons")
    if is_image and len(axes) > 2:
        _image_marks(axes[2], pair, heads.sum(0), neurons.sum(0), _regions(pair, model))
        axes[2].set_title("circuit per image patch\n(summed over layers)", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def view(text: tuple, image: tuple, path=None, *, model=None, title: str | None = None) -> str:
    """The interactive circuit viewer (`modality_circuits.viewer`) of a task's textual and visual circuits: one
    self-contained HTML page (no server, no network). text, image: (circuit, pair, scores or None) each;
    model: for tiled layouts' patch regions. Writes it to `path` (atomically) when given; returns the HTML."""
    from .execution.store import atomic
    from .viewer import page, panel_data

    panels = [panel_data(c, p, s, _regions(p, model) if p.grid[2] else {}) for c, p, s in (text, image)]
    circuit = text[0]
    html = page(panels, title or f"{circuit.task or 'circuits'}: textual and visual circuits ({circuit.model})")
    if path is not None:
        with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(html)
    return html
