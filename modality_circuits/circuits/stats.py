"""Bootstrap confidence intervals over prompts (docs/method.md section 9)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class CI:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def draws(n: int | tuple[int, ...], resamples: int = 1000, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """The index arrays `bootstrap(..., n, resamples=, seed=)` resamples with: one tuple (one array per set) a draw."""
    sizes = n if isinstance(n, tuple) else (n,)
    if min(sizes) < 1:
        raise ValueError("bootstrap needs at least one prompt in every set")
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, k, k) for k in sizes) for _ in range(resamples)]


def bootstrap(stat: Callable[..., float], n: int | tuple[int, ...], *, resamples: int = 1000, level: float = 0.95,
              seed: int = 0) -> CI:
    """Percentile CI of stat(indices) over `resamples` resamplings of n prompt indices with replacement.

    With n a tuple of sizes (independent prompt sets), stat receives one index array per set.
    """
    sizes = n if isinstance(n, tuple) else (n,)
    values = np.array([stat(*idx) for idx in draws(sizes, resamples, seed)], dtype=float)
    values = values[np.isfinite(values)]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) if len(values) else (np.nan, np.nan)
    return CI(float(stat(*(np.arange(k) for k in sizes))), float(lo), float(hi))
