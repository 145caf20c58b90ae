"""Scalar metrics of circuits: faithfulness from logit differences, IoU and nIoU of node sets (docs/method.md sections 4-5)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.special import gammaln


def faithfulness_value(ld_c, ld_full, ld_empty, aggregation: str = "ratio_of_means") -> float:
    """Ratio of means (default, as in MIB) or mean of per-pair ratios."""
    if aggregation == "ratio_of_means":
        return float((ld_c.mean() - ld_empty.mean()) / (ld_full.mean() - ld_empty.mean()))
    if aggregation == "mean_of_ratios":
        return float(((ld_c - ld_empty) / (ld_full - ld_empty)).mean())
    raise ValueError(f"unknown aggregation {aggregation!r}: use 'ratio_of_means' or 'mean_of_ratios'")


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


NIOU_FORMULAS = ("normalised", "unclipped", "reference")


def niou(a: torch.Tensor, b: torch.Tensor, formula: str = "normalised") -> float:
    """max(0, (IoU − b) / (1 − b)) with b the expected IoU of random sets of the same sizes.

    formula="unclipped": (IoU − b) / (1 − b), negative when the sets overlap less than chance.
    formula="reference": IoU − 2b, what the reference notebook's expression evaluated to (an operator
    precedence slip, docs/method.md section 11), offered only to compare with its numbers.
    """
    if formula not in NIOU_FORMULAS:
        raise ValueError(f"formula must be one of {NIOU_FORMULAS}, got {formula!r}")
    base = expected_iou(a.numel(), int(a.sum()), int(b.sum()))
    value = iou(a, b)
    if np.isnan(value) or np.isnan(base):
        return float("nan")
    if formula == "reference":
        return value - 2 * base
    if base >= 1.0:
        return 1.0
    normalised = (value - base) / (1.0 - base)
    return normalised if formula == "unclipped" else max(0.0, normalised)
