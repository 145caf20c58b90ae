"""Counterfactual patching: exact single-node patching (ground truth) and circuit ablation (METHOD.md 3-4).

Every trace puts the counterfactual rows p' first and unpatched, so at every layer
their activations are a(p') and patched rows copy from them in the same forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import nnsight
import torch
from tqdm.auto import tqdm

from .circuit import Circuit
from .pairs import Pair, batch, check_aligned, predictions
from .stats import CI, bootstrap


def _logit_diff(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """LD = logit_r − logit_r' at the last position; logits (R, V), answers (R, 2) -> (R,)."""
    ld = logits.gather(-1, answers)
    return ld[:, 0] - ld[:, 1]


def _answers(pairs: list[Pair], device) -> torch.Tensor:
    return torch.tensor([[p.answer_id, p.cf_answer_id] for p in pairs], device=device)


def logit_diffs(model, pairs: list[Pair], which: str = "prompt") -> torch.Tensor:
    """(P,) LD(p) (which="prompt") or LD(p') (which="cf") of each pair, unpatched."""
    return _logit_diff(predictions(model, pairs, which), _answers(pairs, "cpu"))


def _ablate_trace(model, inputs, answers, keep_heads, keep_neurons, circ_of_row, n_cf):
    """LD of rows n_cf.. where, per layer, nodes with keep=False take the value of their pair's p' row.

    keep_heads (C, L, H, T), keep_neurons (C, L, I, T): bool masks per circuit; circ_of_row (R,) picks
    the circuit of each patched row; patched row r copies from p' row (r mod n_cf).
    """
    H = model.n_heads
    src = torch.arange(len(circ_of_row)) % n_cf
    with model.trace(inputs):
        for i, layer in enumerate(model.layers()):
            for envoy, keep in ((model.attn_out(layer), keep_heads), (model.mlp_out(layer), keep_neurons)):
                a = envoy.input
                own, cf = a[n_cf:], a[:n_cf][src]
                k = keep[:, i][circ_of_row].transpose(1, 2).to(a.device)  # (R, T, units)
                if keep is keep_heads:
                    own, cf = own.view(*own.shape[:2], H, -1), cf.view(*cf.shape[:2], H, -1)
                    k = k.unsqueeze(-1)
                envoy.input = torch.cat([a[:n_cf], torch.where(k, own, cf).flatten(2)])
        ld = nnsight.save(_logit_diff(model.nn.output.logits[n_cf:, -1], answers))
    return ld.cpu()


def ablation_lds(model, circuits: list[Circuit], pairs: list[Pair], *, max_rows: int = 64, progress: bool = False) -> torch.Tensor:
    """(C, P) LD of every pair with every node outside each circuit set to its p' value.

    Identical circuits are evaluated once, so equal circuits give equal numbers.
    """
    check_aligned(pairs)
    for c in circuits:
        if c.heads.shape[-1] != pairs[0].length:
            raise ValueError(f"circuit covers {c.heads.shape[-1]} positions, pairs have {pairs[0].length}")
    keys = [(c.heads.numpy().tobytes(), c.neurons.numpy().tobytes()) for c in circuits]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    unique = sorted(set(first.values()))
    keep_h = torch.stack([circuits[i].heads for i in unique])
    keep_n = torch.stack([circuits[i].neurons for i in unique])
    P, out = len(pairs), []
    per_chunk = max(1, max_rows // P - 1)  # circuits per trace, P rows each plus P p' rows
    for start in tqdm(range(0, len(unique), per_chunk), desc="ablate", disable=not progress, leave=False):
        idx = torch.arange(start, min(start + per_chunk, len(unique)))
        inputs = batch([p.cf_inputs for p in pairs] + [p.inputs for p in pairs] * len(idx))
        answers = _answers(pairs, model.device).repeat(len(idx), 1)
        ld = _ablate_trace(model, inputs, answers, keep_h[idx], keep_n[idx], idx.repeat_interleave(P) - start, P)
        out.append(ld.view(len(idx), P))
    lds = torch.cat(out)
    row = {u: j for j, u in enumerate(unique)}
    return lds[[row[first[k]] for k in keys]]


@dataclass
class Faithfulness:
    """F = (m(C) − m(∅)) / (m(M) − m(∅)); per-pair LDs kept for bootstrapping."""

    value: float
    ld_circuit: torch.Tensor  # (P,)
    ld_full: torch.Tensor  # (P,) nothing patched
    ld_empty: torch.Tensor  # (P,) every node patched
    aggregation: str = "ratio_of_means"

    def ci(self, resamples: int = 1000, seed: int = 0) -> CI:
        """Bootstrap interval of F over the evaluation pairs."""
        return bootstrap(lambda i: faithfulness_value(self.ld_circuit[i], self.ld_full[i], self.ld_empty[i], self.aggregation),
                         len(self.ld_full), resamples=resamples, seed=seed)


def faithfulness_value(ld_c, ld_full, ld_empty, aggregation: str = "ratio_of_means") -> float:
    """Ratio of means (default, as in MIB) or mean of per-pair ratios."""
    if aggregation == "ratio_of_means":
        return float((ld_c.mean() - ld_empty.mean()) / (ld_full.mean() - ld_empty.mean()))
    if aggregation == "mean_of_ratios":
        return float(((ld_c - ld_empty) / (ld_full - ld_empty)).mean())
    raise ValueError(f"unknown aggregation {aggregation!r}: use 'ratio_of_means' or 'mean_of_ratios'")


def faithfulness(model, circuit: Circuit, pairs: list[Pair], *, aggregation: str = "ratio_of_means") -> Faithfulness:
    """Faithfulness of `circuit` under counterfactual ablation of every node outside it."""
    if circuit.model != model.name:
        raise ValueError(f"circuit was found on {circuit.model!r}, not {model.name!r}")
    lds = ablation_lds(model, [circuit, Circuit.full(circuit, True), Circuit.full(circuit, False)], pairs)
    return Faithfulness(faithfulness_value(*lds, aggregation), *lds, aggregation)


def exact_patching(model, pairs: list[Pair], nodes: list[tuple[str, int, int, int]], *, max_rows: int = 128,
                   progress: bool = False) -> torch.Tensor:
    """(N,) mean over pairs of LD(p with a_n := a_n(p')) − LD(p) for nodes ("head"|"neuron", layer, unit, pos)."""
    check_aligned(pairs)
    P, H = len(pairs), model.n_heads
    base = logit_diffs(model, pairs)
    per_chunk = max(1, max_rows // P - 1)
    out = []
    for start in tqdm(range(0, len(nodes), per_chunk), desc="exact patching", disable=not progress, leave=False):
        chunk = nodes[start:start + per_chunk]
        inputs = batch([p.cf_inputs for p in pairs] + [p.inputs for _ in chunk for p in pairs])
        answers = _answers(pairs, model.device).repeat(len(chunk), 1)
        kinds = [k for k, *_ in chunk]
        layer_of, unit, pos = (torch.tensor([n[i] for n in chunk]) for i in (1, 2, 3))
        with model.trace(inputs):
            for i, layer in enumerate(model.layers()):
                for kind, envoy in (("head", model.attn_out(layer)), ("neuron", model.mlp_out(layer))):
                    js = torch.tensor([j for j, k in enumerate(kinds) if k == kind and layer_of[j] == i], dtype=torch.long)
                    if len(js) == 0:
                        continue
                    # node j patches rows P + j*P .. P + (j+1)*P from the p' rows 0..P
                    rows = (P + js[:, None] * P + torch.arange(P)).flatten()
                    src, t, u = torch.arange(P).repeat(len(js)), pos[js].repeat_interleave(P), unit[js].repeat_interleave(P)
                    a = envoy.input.clone()
                    view = a.view(*a.shape[:2], H, -1) if kind == "head" else a
                    view[rows, t, u] = view[src, t, u]
                    envoy.input = a
            ld = nnsight.save(_logit_diff(model.nn.output.logits[P:, -1], answers))
        out.append((ld.cpu().view(len(chunk), P) - base).mean(1))
    return torch.cat(out)


MIB_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
FINE_GRID = tuple(round(0.01 * i, 2) for i in range(1, 31))


@dataclass
class Curve:
    """Faithfulness over circuit fractions, with the discovered (smallest faithful) fraction, CPR and CMD."""

    fractions: list[float]
    values: list[float]
    ld_circuits: torch.Tensor  # (F, P)
    ld_full: torch.Tensor
    ld_empty: torch.Tensor
    threshold: float
    minimal_fraction: float | None  # smallest fraction with F >= threshold (None if never reached)
    cpr: float  # area under F over fraction in [0, 1]
    cmd: float  # area under |1 − F|


def faithfulness_curve(model, scores, pairs: list[Pair], fractions=None, *, threshold: float = 0.8,
                       aggregation: str = "ratio_of_means", progress: bool = False) -> Curve:
    """F of the top-f circuits of `scores` over a grid (default: MIB's grid plus a fine 1..30 % grid)."""
    fractions = sorted(set(fractions or MIB_GRID + FINE_GRID))
    circuits = [Circuit.from_scores(scores, fraction=f) for f in fractions]
    lds = ablation_lds(model, [Circuit.full(scores, True), Circuit.full(scores, False), *circuits], pairs, progress=progress)
    full, empty = lds[0], lds[1]
    values = [faithfulness_value(ld, full, empty, aggregation) for ld in lds[2:]]
    minimal = next((f for f, v in zip(fractions, values) if v >= threshold), None)
    x = torch.tensor([0.0, *fractions], dtype=torch.float64)
    y = torch.tensor([0.0, *values], dtype=torch.float64)
    if x[-1] < 1.0:  # the curve ends at the full model
        x, y = torch.cat([x, torch.ones(1, dtype=x.dtype)]), torch.cat([y, torch.ones(1, dtype=y.dtype)])
    return Curve(fractions, values, lds[2:], full, empty, threshold, minimal,
                 float(torch.trapezoid(y, x)), float(torch.trapezoid((1 - y).abs(), x)))


@dataclass
class PositionEffect:
    """Mean effect on LD of patching every node at a position to its p' value; per position and per span."""

    per_position: torch.Tensor  # (T,)
    per_span: dict[str, float]
    per_pair: torch.Tensor | None = None  # (T, P) exact effects, for bootstrapping


def position_effect(model, pairs: list[Pair], scores=None) -> PositionEffect:
    """Exact effect (one ablation per position), or the attributed one when `scores` are given."""
    check_aligned(pairs)
    spans, per_pair = pairs[0].spans, None
    if scores is not None:
        effect = scores.position_effect()
    else:
        T = pairs[0].length
        full = Circuit(torch.ones(model.n_layers, model.n_heads, T, dtype=torch.bool),
                       torch.ones(model.n_layers, model.d_mlp, T, dtype=torch.bool), spans, model.name)
        probes = []
        for t in range(T):
            c = Circuit.full(full, True)
            c.heads[..., t] = False
            c.neurons[..., t] = False
            probes.append(c)
        per_pair = ablation_lds(model, [full, *probes], pairs)
        per_pair = per_pair[1:] - per_pair[:1]
        effect = per_pair.mean(1)
    return PositionEffect(effect, {s: float(effect[a:b].mean()) for s, (a, b) in spans.items()}, per_pair)
