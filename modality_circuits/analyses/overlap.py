"""Overlap of the textual and visual circuits of a task, span by span (docs/method.md section 5).

Q and G nodes are aligned across modalities by their offset from the end of the span; D nodes
are compared without position, as sets of (layer, unit) present at any data position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..circuits.circuit import Circuit
from ..circuits.metrics import iou, niou
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
        finite = [v for v in (self.niou_heads, self.niou_neurons) if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")


def overlap(text: Circuit, visual: Circuit, *, niou_formula: str = "normalised") -> dict[str, SpanOverlap]:
    """IoU and nIoU of two circuits (normally one textual, one visual) per span D, Q, G.

    niou_formula: "normalised" (ours) or "reference" (IoU − 2b, see `circuits.metrics.niou`)."""
    if text.heads.shape[:2] != visual.heads.shape[:2] or text.neurons.shape[:2] != visual.neurons.shape[:2]:
        raise ValueError("circuits come from models of different sizes")
    out = {}
    for span in SPANS:
        lengths = [c.spans[span][1] - c.spans[span][0] for c in (text, visual)]
        (th, tn), (vh, vn) = (span_masks(c, span, min(lengths)) for c in (text, visual))
        out[span] = SpanOverlap(iou(th, vh), iou(tn, vn), niou(th, vh, niou_formula), niou(tn, vn, niou_formula))
    return out
