"""Overlap of the textual and visual circuits of a task, span by span (METHOD.md section 5).

Q and G nodes are aligned across modalities by their offset from the end of the span; D nodes
are compared without position, as sets of (layer, unit) present at any data position.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.special import gammaln

from .circuit import Circuit
from .pairs import SPANS


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks of the same shape (nan when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else float("nan")


def _log_choose(n, k):
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


@lru_cache(maxsize=65536)
def expected_iou(n: int, size_a: int, size_b: int) -> float:
    """Exact E[IoU] of two uniformly random subsets of sizes size_a, size_b of an n-element universe.

    |A ∩ B| is hypergeometric; IoU = X / (a + b − X). The pmf is computed in log space (the
    bootstrap calls this thousands of times; scipy's hypergeom.pmf takes ~10 ms a call).
    """
    if size_a == 0 and size_b == 0:
        return float("nan")
    x = np.arange(max(0, size_a + size_b - n), min(size_a, size_b) + 1, dtype=float)
    pmf = np.exp(_log_choose(size_a, x) + _log_choose(n - size_a, size_b - x) - _log_choose(n, size_b))
    return float((pmf * x / (size_a + size_b - x)).sum())


def niou(a: torch.Tensor, b: torch.Tensor) -> float:
    """max(0, (IoU − b) / (1 − b)) with b the expected IoU of random sets of the same sizes."""
    base = expected_iou(a.numel(), int(a.sum()), int(b.sum()))
    value = iou(a, b)
    if np.isnan(value) or np.isnan(base):
        return float("nan")
    return 1.0 if base >= 1.0 else max(0.0, (value - base) / (1.0 - base))


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


def overlap(text: Circuit, visual: Circuit) -> dict[str, SpanOverlap]:
    """IoU and nIoU of two circuits (normally one textual, one visual) per span D, Q, G."""
    if text.heads.shape[:2] != visual.heads.shape[:2] or text.neurons.shape[:2] != visual.neurons.shape[:2]:
        raise ValueError("circuits come from models of different sizes")
    out = {}
    for span in SPANS:
        lengths = [c.spans[span][1] - c.spans[span][0] for c in (text, visual)]
        (th, tn), (vh, vn) = (span_masks(c, span, min(lengths)) for c in (text, visual))
        out[span] = SpanOverlap(iou(th, vh), iou(tn, vn), niou(th, vh), niou(tn, vn))
    return out
