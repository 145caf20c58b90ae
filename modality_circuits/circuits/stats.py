"""Bootstrap confidence intervals over prompts (docs/method.md section 9)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# Above this share of the draws with an undefined (nan/inf) statistic the interval is not given.
MAX_DROPPED = 0.01


@dataclass(frozen=True)
class CI:
    """A point estimate with a percentile bootstrap interval over the finite resamples.

    dropped: resamples whose statistic was nan or inf (left out of the interval); reason: why the
    interval is not given (low and high are then nan), None when it is."""

    value: float
    low: float
    high: float
    dropped: int = 0
    resamples: int = 0
    reason: str | None = None

    def as_dict(self) -> dict:
        out = {"value": self.value, "low": self.low, "high": self.high, "dropped": self.dropped,
               "resamples": self.resamples}
        return {**out, "reason": self.reason} if self.reason else out

    def __str__(self) -> str:
        if self.reason:
            return f"{self.value:.3f} [n/a: {self.reason}]"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def index_matrices(n: int | tuple[int, ...], resamples: int = 1000, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The bootstrap's draws: one (resamples, n_s) int64 index matrix per prompt set of sizes n.

    Generator: numpy.random.default_rng(seed).integers(0, high, (resamples, Σ n_s)), with high holding each
    set's size over its n_s columns; set s takes its own columns. Row b is draw b (for one set, exactly
    default_rng(seed).integers(0, n, (resamples, n))).
    """
    sizes = n if isinstance(n, tuple) else (n,)
    if min(sizes) < 1:
        raise ValueError("bootstrap needs at least one prompt in every set")
    high = np.repeat(np.array(sizes), sizes)  # column j draws from range(size of its set)
    rows = np.random.default_rng(seed).integers(0, high, (resamples, len(high)))
    return tuple(np.split(rows, np.cumsum(sizes)[:-1], axis=1))


def draws(n: int | tuple[int, ...], resamples: int = 1000, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """The index arrays `bootstrap(..., n, resamples=, seed=)` resamples with: one tuple (one array per set) a draw."""
    return list(zip(*index_matrices(n, resamples, seed)))


def interval(value: float, values: np.ndarray, level: float = 0.95) -> CI:
    """Percentile interval of the finite `values` (one per resample) around the point estimate `value`.

    More than MAX_DROPPED of them undefined: no interval (low, high nan), with the reason."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    dropped, total = len(values) - len(finite), len(values)
    reason = None
    if dropped > MAX_DROPPED * total:
        reason = f"{dropped}/{total} resamples undefined"
        lo = hi = np.nan
    else:
        lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return CI(float(value), float(lo), float(hi), dropped, total, reason)


def bootstrap(stat: Callable[..., float], n: int | tuple[int, ...], *, resamples: int = 1000, level: float = 0.95,
              seed: int = 0, vectorised: bool = False) -> CI:
    """Percentile CI of stat(indices) over `resamples` resamplings of n prompt indices with replacement.

    With n a tuple of sizes (independent prompt sets), stat receives one index array per set.
    vectorised=True: stat receives one (B, n_s) index matrix per set and returns the B statistics at once
    (`index_matrices`: the same draws); the point estimate is its value on the (1, n_s) identity rows.
    Resamples with a nan or inf statistic are counted (`CI.dropped`) and left out (see `interval`).
    """
    matrices = index_matrices(n, resamples, seed)
    identity = tuple(np.arange(m.shape[1]) for m in matrices)
    if vectorised:
        values = np.asarray(stat(*matrices), dtype=float).reshape(resamples)
        point = np.asarray(stat(*(i[None] for i in identity)), dtype=float).reshape(())
    else:
        values = np.array([stat(*idx) for idx in zip(*matrices)], dtype=float)
        point = stat(*identity)
    return interval(float(point), values, level)


def bootstrap_mean(x, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> CI:
    """`bootstrap` of the mean over prompts, vectorised: x (P,) per-prompt values (numpy or torch), or (S, P)
    numpy values of S rows (the mean of all entries of a draw's columns, summed as x[:, idx].mean() sums them)."""
    if x.ndim == 1:
        return bootstrap(lambda i: x[i].mean(-1), len(x), resamples=resamples, level=level, seed=seed, vectorised=True)
    return bootstrap(lambda i: x[:, i].mean((0, 2)), x.shape[1], resamples=resamples, level=level, seed=seed,
                     vectorised=True)
