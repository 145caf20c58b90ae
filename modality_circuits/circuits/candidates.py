"""Bootstrapped circuits of large models without every pair's scores: a candidate set with a certificate.

A resample b of the P discovery pairs (pair i drawn w_bi times) gives node n the mean score
m_bn = Σ_i w_bi s_in / P. By Cauchy–Schwarz |m_bn| ≤ ‖w_b‖₂ · ‖s_n‖₂ / P, and ‖s_n‖₂² is
`Scores.square_sums`, which attribution accumulates for every node at no extra cost. The circuit of
resample b is its top k heads and top k' neurons by |m_bn|. Keep per-pair scores only for a candidate
set C (per kind); then for every resample, with τ_b the k-th largest |m_bn| over C,

    τ_b > ‖w_b‖₂ · max_{n ∉ C} ‖s_n‖₂ / P

proves that no node outside C reaches the top k, so the top k over C is the resampled circuit over
all nodes, exactly. `certify` checks this for every draw of the bootstrap.
"""
from __future__ import annotations

import numpy as np
import torch

from .circuit import Scores, _top_mask


def _k(t: torch.Tensor, fraction: float) -> int:
    return int(fraction * t.numel())  # as Circuit.from_scores


def candidates(scores: Scores, fraction: float, draws: list[np.ndarray], slack: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(head index, neuron index): flat indices of the nodes whose bound reaches `slack` × the k-th largest |mean|.

    draws: the bootstrap's index arrays of these scores' pairs. Smaller slack, larger (safer) set.
    """
    if scores.square_sums is None:
        raise ValueError("these scores have no square sums: attribute them with this version of modality_circuits")
    P = scores.n_pairs
    w_max = max(float(np.linalg.norm(np.bincount(idx, minlength=P))) for idx in draws)
    out = []
    for mean, squares in zip((scores.heads, scores.neurons), scores.square_sums):
        k = _k(mean, fraction)
        if k == 0:
            out.append(torch.zeros(0, dtype=torch.long))
            continue
        tau = torch.topk(mean.abs().flatten(), k).values[-1]
        bound = w_max * squares.flatten().clamp_min(0).sqrt() / P
        top = _top_mask(mean, k).flatten().nonzero().flatten()  # the circuit's own nodes, ties as it breaks them
        out.append(torch.unique(torch.cat([top, (bound >= slack * tau).nonzero().flatten()])))
    return out[0], out[1]


def certify(scores: Scores, fraction: float, draws: list[np.ndarray]) -> list[int]:
    """The draws whose resampled circuit is NOT proven to lie inside `scores.kept` (empty: all certified)."""
    P = scores.n_pairs
    failed = []
    outside = []
    for squares, kept in zip(scores.square_sums, scores.kept):
        norms = squares.flatten().clamp_min(0).sqrt()
        rest = torch.ones(norms.numel(), dtype=torch.bool)
        rest[kept] = False
        outside.append(float(norms[rest].max()) if rest.any() else 0.0)
    for b, idx in enumerate(draws):
        w = float(np.linalg.norm(np.bincount(idx, minlength=P)))
        for values, like, out in zip(scores.per_pair, (scores.heads, scores.neurons), outside):
            k = _k(like, fraction)
            if k == 0:
                continue
            if k > values.shape[1]:
                failed.append(b)
                break
            tau = float(torch.topk(values[idx].mean(0).abs(), k).values[-1])
            if not tau > w * out / P:
                failed.append(b)
                break
    return failed
