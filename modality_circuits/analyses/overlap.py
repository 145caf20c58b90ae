"""Overlap of the textual and visual circuits of a task, span by span (docs/method.md section 5).

Q and G nodes are aligned across modalities by their offset from the end of the span; D nodes
are compared without position, as sets of (layer, unit) present at any data position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..circuits.circuit import Circuit
from ..circuits.metrics import ious, nious
from ..data.pairs import SPANS


def span_masks(circuit: Circuit, span: str, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, neurons) of `span` in a modality-independent layout.

    D: (L, units), a unit counts if present at any data position. Q/G: the last `length`
    positions of the span (default all), (L, units, length), aligned by offset from the span end.
    """
    start, end = circuit.spans[span]
    if span == "D":
        return circuit.heads[..., start:end].any(-1), circuit.neurons[..., start:end].any(-1)
    length = length or end - start
    return circuit.heads[..., end - length:end], circuit.neurons[..., end - length:end]


@dataclass
class SpanOverlap:
    iou_heads: float
    iou_neurons: float
    niou_heads: float
    niou_neurons: float

    @property
    def niou(self) -> float:
        """The span's score: mean of the head and neuron nIoU."""
        return float(_score(np.float64(self.niou_heads), np.float64(self.niou_neurons)))


def _score(niou_heads: np.ndarray, niou_neurons: np.ndarray) -> np.ndarray:
    """The span's score, elementwise: mean of the finite of the head and neuron nIoU (nan where neither is)."""
    both = np.stack([niou_heads, niou_neurons])
    ok = np.isfinite(both)
    with np.errstate(invalid="ignore"):
        return np.where(ok, both, 0.0).sum(0) / ok.sum(0)


def _span_values(text: Circuit, visual: Circuit, span: str, formula: str) -> tuple[np.ndarray, ...]:
    """(B,) IoU and nIoU of heads and of neurons in `span` of text[b] and visual[b] (masks with a leading axis)."""
    lengths = [c.spans[span][1] - c.spans[span][0] for c in (text, visual)]
    (th, tn), (vh, vn) = (span_masks(c, span, min(lengths)) for c in (text, visual))
    return ious(th, vh), ious(tn, vn), nious(th, vh, formula), nious(tn, vn, formula)


def overlap(text: Circuit, visual: Circuit, *, niou_formula: str = "normalised") -> dict[str, SpanOverlap]:
    """IoU and nIoU of two circuits (normally one textual, one visual) per span D, Q, G.

    niou_formula: "normalised" (ours) or "reference" (IoU − 2b, see `circuits.metrics.niou`)."""
    if text.heads.shape[:2] != visual.heads.shape[:2] or text.neurons.shape[:2] != visual.neurons.shape[:2]:
        raise ValueError("circuits come from models of different sizes")
    text, visual = (Circuit(c.heads[None], c.neurons[None], c.spans, c.model) for c in (text, visual))
    return {s: SpanOverlap(*(float(v[0]) for v in _span_values(text, visual, s, niou_formula))) for s in SPANS}


def resampled_niou(text: Circuit, visual: Circuit, *, niou_formula: str = "normalised") -> dict[str, np.ndarray]:
    """Per span, the (B,) nIoU score (`SpanOverlap.niou`) of text[b] and visual[b]: circuits with a leading
    resample axis (`Circuit.resampled`), one bootstrap draw a row."""
    return {s: _score(*_span_values(text, visual, s, niou_formula)[2:]) for s in SPANS}
