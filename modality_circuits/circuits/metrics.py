"""Scalar metrics of circuits: faithfulness from logit differences, IoU and nIoU of node sets (docs/method.md sections 4-5)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.special import gammaln


def faithfulness_value(ld_c, ld_full, ld_empty, aggregation: str = "ratio_of_means") -> float:
    """Ratio of means (default, as in MIB) or mean of per-pair ratios."""
    return float(faithfulness_values(ld_c, ld_full, ld_empty, aggregation))


def faithfulness_values(ld_c, ld_full, ld_empty, aggregation: str = "ratio_of_means"):
    """`faithfulness_value` over the last axis (pairs) of LDs of shape (..., P): one F per leading index,
    e.g. per bootstrap resample (LDs gathered with a (B, P) index matrix)."""
    if aggregation == "ratio_of_means":
        return (ld_c.mean(-1) - ld_empty.mean(-1)) / (ld_full.mean(-1) - ld_empty.mean(-1))
    if aggregation == "mean_of_ratios":
        return ((ld_c - ld_empty) / (ld_full - ld_empty)).mean(-1)
    raise ValueError(f"unknown aggregation {aggregation!r}: use 'ratio_of_means' or 'mean_of_ratios'")


def count(mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64: the True entries of each mask[i] of a boolean (B, ...) tensor. Summed as bytes with an int32
    accumulator where no count can overflow it (a bool sum converts every entry to int64: about 15x slower)."""
    flat = mask.flatten(1)
    return flat.view(torch.uint8).sum(1, dtype=torch.int32 if flat.shape[1] < 2**31 else torch.int64).long()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks of the same shape (nan when both are empty)."""
    return float(ious(a[None], b[None])[0])


def ious(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(B,) float64: `iou` of a[i] and b[i], boolean masks (B, ...) (e.g. one resampled circuit a row)."""
    union, inter = count(a | b).numpy(), count(a & b).numpy()
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


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
    return float(nious(a[None], b[None], formula)[0])


def nious(a: torch.Tensor, b: torch.Tensor, formula: str = "normalised") -> np.ndarray:
    """(B,) float64: `niou` of a[i] and b[i], boolean masks (B, ...) (e.g. one resampled circuit a row)."""
    if formula not in NIOU_FORMULAS:
        raise ValueError(f"formula must be one of {NIOU_FORMULAS}, got {formula!r}")
    n = a[0].numel()
    base = np.array([expected_iou(n, int(x), int(y)) for x, y in zip(count(a).tolist(), count(b).tolist())])
    value = ious(a, b)
    if formula == "reference":
        out = value - 2 * base
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            normalised = (value - base) / (1.0 - base)
            if formula == "normalised":
                normalised = np.maximum(0.0, normalised)
            out = np.where(base >= 1.0, 1.0, normalised)
    return np.where(np.isnan(value) | np.isnan(base), np.nan, out)
