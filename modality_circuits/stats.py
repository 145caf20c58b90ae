"""Bootstrap confidence intervals over prompts (METHOD.md section 9)."""
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


def bootstrap(stat: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000, level: float = 0.95,
              seed: int = 0) -> CI:
    """CI of stat(indices) over `resamples` resamplings of n prompt indices with replacement."""
    if n < 1:
        raise ValueError("bootstrap needs at least one prompt")
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    draws = draws[np.isfinite(draws)]
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]) if len(draws) else (np.nan, np.nan)
    return CI(float(stat(np.arange(n))), float(lo), float(hi))
