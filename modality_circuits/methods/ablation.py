"""Circuit ablation: logit differences, faithfulness, faithfulness curves and the position effect (METHOD.md 4).

Every ablation trace puts the counterfactual rows p' first and unpatched, so at every layer
their activations are a(p') and patched rows copy from them in the same forward: a node
outside the circuit takes its p' value.
"""
from __future__ import annotations

from dataclasses import dataclass

import nnsight
import torch

from ..circuits.circuit import Circuit
from ..circuits.metrics import faithfulness_value
from ..data.pairs import Pair, batch, check_layout
from ..execution import requests
from ..execution.remote import server_body


def answers(pairs: list[Pair]) -> torch.Tensor:
    """(P, 2) answer ids (r, r') of each pair."""
    return torch.tensor([[p.answer_id, p.cf_answer_id] for p in pairs])


def pack(mask: torch.Tensor) -> tuple[torch.Tensor, tuple, int]:
    """A bool mask as bits (8 per byte) for the wire, with its shape and size; unpacked in the server bodies."""
    flat = mask.flatten()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    packed = (flat.view(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return packed, tuple(mask.shape), mask.numel()


@server_body
def _ld_session(model, chunks: list) -> list:
    """One request: unpatched LD (float32) of each chunk (inputs, answers (R, 2)) -> [(R,)]."""
    root = model.nn
    with model.session():
        lds = []
        for inputs, ids in chunks:
            with root.trace(**inputs):
                logits = root.output.logits[:, -1].float()
                ld = logits.gather(-1, ids.to(logits.device))  # LD inline: a server body calls no package helper
            lds.append((ld[:, 0] - ld[:, 1]).cpu())
        result = nnsight.save(lds)
    return result


def logit_diffs(model, pairs: list[Pair], which: str = "prompt", *, max_rows: int = 64) -> torch.Tensor:
    """(P,) LD(p) (which="prompt") or LD(p') (which="cf") of each pair, unpatched."""
    work = [(model.prepare(batch([p.inputs if which == "prompt" else p.cf_inputs for p in chunk])), answers(chunk))
            for chunk in requests.chunked(pairs, max_rows)]
    return torch.cat(requests.run(model, _ld_session, work))


@server_body
def _ablate_session(model, chunks: list, cf_inputs: dict, inputs: dict, ids: torch.Tensor) -> list:
    """One request: for each chunk, LD of its patched rows, where per layer nodes with keep=False take p' values.

    cf_inputs / inputs: the P pairs' p' and p; each chunk (n, masks, circ_of_row) runs P p' rows then
    n·P rows of p; masks: packed keep_heads (n, L, H, T) and keep_neurons (n, L, I, T); circ_of_row
    (n·P,) picks each patched row's circuit; patched row r copies from p' row (r mod P).
    """
    H, P = model.n_heads, len(ids)
    root = model.nn
    sites = [(model.head_site(layer), model.neuron_site(layer)) for layer in model.layers()]
    bits = torch.arange(8, dtype=torch.uint8)
    with model.session():
        lds = []
        for n, masks, circ_of_row in chunks:
            keeps = [((packed[:, None] >> bits) & 1).bool().flatten()[:size].view(shape) for packed, shape, size in masks]
            rows = {key: torch.cat([cf_inputs[key]] + [inputs[key]] * n) for key in inputs}
            src = torch.arange(len(circ_of_row)) % P
            with root.trace(**rows):
                for i in range(len(sites)):
                    for j in range(2):  # heads, then neurons
                        a = sites[i][j].input
                        own, cf = a[P:], a[:P][src.to(a.device)]
                        k = keeps[j][:, i].to(a.device)[circ_of_row.to(a.device)].transpose(1, 2)  # (R, T, units)
                        if j == 0:
                            own, cf = own.view(*own.shape[:2], H, -1), cf.view(*cf.shape[:2], H, -1)
                            k = k.unsqueeze(-1)
                        sites[i][j].input = torch.cat([a[:P], torch.where(k, own, cf).flatten(2)])
                logits = root.output.logits[P:, -1]
                ld = logits.gather(-1, ids.repeat(n, 1).to(logits.device))  # LD inline (server body)
            lds.append((ld[:, 0] - ld[:, 1]).cpu())
            del a, own, cf, k, logits  # the next chunk must not hold these too
        result = nnsight.save(lds)
    return result


def ablation_lds(model, circuits: list[Circuit], pairs: list[Pair], *, max_rows: int = 64, progress: bool = False) -> torch.Tensor:
    """(C, P) LD of every pair with every node outside each circuit set to its p' value.

    Identical circuits are evaluated once, so equal circuits give equal numbers. Remote:
    `model.chunks_per_request` chunks of circuits per request, masks sent as bits, only LDs back.
    """
    check_layout(pairs)
    for c in circuits:
        if c.heads.shape[-1] != pairs[0].length:
            raise ValueError(f"circuit covers {c.heads.shape[-1]} positions, pairs have {pairs[0].length}")
    keys = [(c.heads.numpy().tobytes(), c.neurons.numpy().tobytes()) for c in circuits]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    unique = sorted(set(first.values()))
    keep_h = torch.stack([circuits[i].heads for i in unique])
    keep_n = torch.stack([circuits[i].neurons for i in unique])
    P = len(pairs)
    per_chunk = max(1, max_rows // P - 1)  # circuits per trace, P rows each plus P p' rows
    cf_inputs = model.prepare(batch([p.cf_inputs for p in pairs]))
    inputs = model.prepare(batch([p.inputs for p in pairs]))
    work = []
    for idx in requests.chunked(torch.arange(len(unique)), per_chunk):
        work.append((len(idx), (pack(keep_h[idx]), pack(keep_n[idx])), idx.repeat_interleave(P) - idx[0]))
    lds = requests.run(model, _ablate_session, work, cf_inputs, inputs, answers(pairs), desc="ablate", progress=progress)
    lds = torch.cat([ld.view(n, P) for ld, (n, _, _) in zip(lds, work)])
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


def faithfulness(model, circuit: Circuit, pairs: list[Pair], *, aggregation: str = "ratio_of_means") -> Faithfulness:
    """Faithfulness of `circuit` under counterfactual ablation of every node outside it."""
    if circuit.model != model.name:
        raise ValueError(f"circuit was found on {circuit.model!r}, not {model.name!r}")
    lds = ablation_lds(model, [circuit, Circuit.full(circuit, True), Circuit.full(circuit, False)], pairs)
    return Faithfulness(faithfulness_value(*lds, aggregation), *lds, aggregation)


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
    """Exact effect (one ablation per position), or the attributed one (`Scores.per_position`) when `scores` are given."""
    check_layout(pairs)
    spans, per_pair = pairs[0].spans, None
    if scores is not None:
        effect = scores.per_position()
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
