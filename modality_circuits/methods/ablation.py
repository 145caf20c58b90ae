"""Circuit ablation: logit differences, faithfulness, faithfulness curves and the position effect (docs/method.md section 4).

Every ablation trace puts the counterfactual rows p' first and unpatched, so at every layer
their activations are a(p') and patched rows copy from them in the same forward: a node
outside the circuit takes its p' value.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import nnsight
import numpy as np
import torch

from ..circuits.circuit import Circuit
from ..circuits.metrics import faithfulness_value
from ..data.pairs import Pair, batch, check_layout
from ..execution import budget, requests
from ..execution.bodies import add_to_output, embed_pass, feed_stack, logit_diff, repeat_rows, rerun_from, route_as_held
from ..execution.checks import finite
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
    root, opts = model.nn, model.FORWARD
    with model.session():
        lds = []
        for inputs, ids in chunks:
            with root.trace(**inputs, **opts):
                ld = logit_diff(root.output.logits[:, -1], ids)
            lds.append(ld.cpu())
        result = nnsight.save(lds)
    return result


def logit_diffs(model, pairs: list[Pair], which: str = "prompt", *, max_rows: int | None = None) -> torch.Tensor:
    """(P,) LD(p) (which="prompt") or LD(p') (which="cf") of each pair, unpatched, in float32."""
    check_layout(pairs)
    size = budget.rows(model, pairs[0].length, max_rows=max_rows)
    work = [(model.prepare(batch([p.inputs if which == "prompt" else p.cf_inputs for p in chunk])), answers(chunk))
            for chunk in requests.chunked(pairs, size)]
    return finite(torch.cat(requests.run(model, _ld_session, work)), "logit_diffs", model)


@server_body
def _ablate_session(model, chunks: list, both: dict, ids: torch.Tensor, vision: tuple) -> list:
    """One request: for each chunk, LD of its patched rows, where per layer nodes with keep=False take p' values.

    both: processor outputs of the P pairs' p' then p (2P rows). A first pass computes their decoder
    inputs (merged embeddings) once; every chunk's forward then starts from them, so the vision tower
    runs once per prompt, not once per row. Each chunk (n, masks, circ_of_row) runs P p' rows then n·P
    rows of p; masks: packed keep_heads (n, L, H or 1, T) and keep_neurons (n, L, I or 1, T) (a unit
    dimension of 1 applies to every unit); circ_of_row (n·P,) picks each patched row's circuit;
    patched row r copies from p' row (r mod P). Mixture-of-experts layers: the first pass runs on to read p's
    routing, and every row is routed as its p (docs/families-2026.md).
    """
    P = len(ids)
    root, layers, opts = model.nn, model.layers(), model.FORWARD
    sites = [(model.head_site(layer), model.neuron_site(layer)) for layer in layers]
    heads_at, moe = model.layer_heads, [model.experts_of(layer) for layer in layers]
    bits = torch.arange(8, dtype=torch.uint8)
    decoder, stack, keys, inject, token_key = rerun_from(model, both, vision)
    with model.session():
        e, g, q, held = embed_pass(root, both, opts, layers, stack, keys, inject, moe=moe, token_key=token_key)
        lds = []
        for n, masks, circ_of_row in chunks:
            keeps = [((packed[:, None] >> bits) & 1).bool().flatten()[:size].view(shape) for packed, shape, size in masks]
            rows = {key: repeat_rows(value, P, n) for key, value in decoder.items()}
            src = torch.arange(len(circ_of_row)) % P
            with root.trace(**rows, **opts):
                if q is not None:  # each row's own prompt's per-token input (Gemma 4's per-layer embeddings)
                    feed_stack(stack, repeat_rows(e, P, n), token_key, repeat_rows(q, P, n))
                layers[0].input = repeat_rows(e, P, n)
                for i in range(len(sites)):
                    for j in range(2):  # heads, then neurons
                        if j == 1 and moe[i] is not None:  # every row routed as its prompt p, before the neurons
                            route_as_held(moe[i], held[i], P, n)
                        site = sites[i][j].input
                        a = site.view(-1, e.shape[1], site.shape[-1])  # a sparse layer's site is (rows·T, E·I)
                        own, cf = a[P:], a[:P][src.to(a.device)]
                        k = keeps[j][:, i].to(a.device)[circ_of_row.to(a.device)].transpose(1, 2)  # (R, T, units or 1)
                        if j == 0:
                            own, cf = own.view(*own.shape[:2], heads_at[i], -1), cf.view(*cf.shape[:2], heads_at[i], -1)
                            k = k.unsqueeze(-1)
                        k = k[:, :, :own.shape[2]]  # a layer with fewer units than the widest: its own
                        sites[i][j].input = torch.cat([a[:P], torch.where(k, own, cf).flatten(2)]).view(site.shape)
                    if inject and i < len(g):  # each row gets its own prompt's injected features
                        add_to_output(layers[i], repeat_rows(g[i], P, n))
                ld = logit_diff(root.output.logits[P:, -1], ids.repeat(n, 1))
            lds.append(ld.cpu())
            del a, own, cf, k  # the next chunk must not hold these too
        result = nnsight.save(lds)
    return result


def _ablate(model, pairs: list[Pair], n_circuits: int, masks, *, max_rows: int | None, desc: str = "ablate",
            progress: bool = False) -> torch.Tensor:
    """(C, P) LD of every pair under each of C ablations; masks(idx) -> (keep_heads, keep_neurons) of circuits idx.

    Masks are built per chunk, never for all circuits at once. Pairs are split too when 2P rows
    exceed the memory budget; one request per pair chunk and `model.chunks_per_request` circuit chunks.
    """
    size = budget.rows(model, pairs[0].length, max_rows=max_rows)
    out = []
    for part in requests.chunked(pairs, max(1, size // 2)):
        P = len(part)
        both = model.prepare(batch([p.cf_inputs for p in part] + [p.inputs for p in part]))
        work = []
        for idx in requests.chunked(torch.arange(n_circuits), max(1, size // P - 1)):  # P p' rows + P rows a circuit
            heads, neurons = masks(idx)
            work.append((len(idx), (pack(heads), pack(neurons)), torch.arange(len(idx)).repeat_interleave(P)))
        lds = requests.run(model, _ablate_session, work, both, answers(part), model.adapter.vision_inputs,
                           desc=desc, progress=progress, units=[n for n, _, _ in work], unit="circuit")
        out.append(torch.cat([ld.view(n, P) for ld, (n, _, _) in zip(lds, work)]))
    return torch.cat(out, 1)


def _digest(c: Circuit) -> bytes:
    """Identity of a circuit's node sets, hashed from the masks' memory (no copy)."""
    digest = hashlib.blake2b(digest_size=16)
    for mask in (c.heads, c.neurons):
        digest.update(np.ascontiguousarray(mask.numpy()).view(np.uint8))
    return digest.digest()


def ablation_lds(model, circuits: list[Circuit], pairs: list[Pair], *, max_rows: int | None = None,
                 progress: bool = False, desc: str = "ablate") -> torch.Tensor:
    """(C, P) LD (float32) of every pair with every node outside each circuit set to its p' value.

    Identical circuits are evaluated once, so equal circuits give equal numbers. Remote:
    `model.chunks_per_request` chunks of circuits per request, masks sent as bits, only LDs back.
    """
    check_layout(pairs)
    want = ((model.n_layers, model.n_heads, pairs[0].length), (model.n_layers, model.d_mlp, pairs[0].length))
    for c in circuits:
        if (tuple(c.heads.shape), tuple(c.neurons.shape)) != want:
            raise ValueError(f"circuit of layout heads {tuple(c.heads.shape)}, neurons {tuple(c.neurons.shape)} does not "
                             f"fit {model.name} on these pairs (heads {want[0]}, neurons {want[1]}: layers, units, "
                             "positions): use a circuit found on this model for pairs of this layout")
    keys = [_digest(c) for c in circuits]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    unique = sorted(set(first.values()))

    def masks(idx):
        return (torch.stack([circuits[unique[i]].heads for i in idx]),
                torch.stack([circuits[unique[i]].neurons for i in idx]))

    lds = finite(_ablate(model, pairs, len(unique), masks, max_rows=max_rows, desc=desc, progress=progress),
                 "ablation_lds", model)
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

    def __repr__(self) -> str:
        means = ", ".join(f"{k} {float(v.mean()):.3f}" for k, v in
                          (("circuit", self.ld_circuit), ("full", self.ld_full), ("empty", self.ld_empty)))
        return f"Faithfulness(F = {self.value:.3f} over {len(self.ld_circuit)} pairs ({self.aggregation}); mean LD {means})"


def faithfulness(model, circuit: Circuit, pairs: list[Pair], *, aggregation: str = "ratio_of_means") -> Faithfulness:
    """Faithfulness of `circuit` under counterfactual ablation of every node outside it."""
    if circuit.model != model.name:
        raise ValueError(f"circuit was found on {circuit.model!r}, not {model.name!r}")
    circuit.check_match(pairs[0], "pairs")
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

    def __repr__(self) -> str:
        found = f"{self.minimal_fraction:.1%}" if self.minimal_fraction is not None else "not reached"
        return (f"Curve({len(self.fractions)} fractions {self.fractions[0]:.1%}..{self.fractions[-1]:.0%} on "
                f"{self.ld_circuits.shape[1]} pairs; smallest with F >= {self.threshold}: {found}; max F "
                f"{max(self.values):.3f}; CPR {self.cpr:.3f}, CMD {self.cmd:.3f})")


def faithfulness_curve(model, scores, pairs: list[Pair], fractions=None, *, threshold: float = 0.8,
                       aggregation: str = "ratio_of_means", progress: bool = True) -> Curve:
    """F of the top-f circuits of `scores` over a grid (default: MIB's grid plus a fine 1..30 % grid)."""
    fractions = sorted(set(fractions or MIB_GRID + FINE_GRID))
    circuits = [Circuit.from_scores(scores, fraction=f) for f in fractions]
    lds = ablation_lds(model, [Circuit.full(scores, True), Circuit.full(scores, False), *circuits], pairs,
                       progress=progress, desc="faithfulness curve")  # the bar moves per circuit (fraction)
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

    def __repr__(self) -> str:
        spans = ", ".join(f"{s} {v:+.3f}" for s, v in self.per_span.items())
        how = f"exact over {self.per_pair.shape[1]} pairs" if self.per_pair is not None else "attributed"
        return f"PositionEffect({len(self.per_position)} positions, {how}; mean Δ LD per span: {spans})"


def position_effect(model, pairs: list[Pair], scores=None, *, positions=None, max_rows: int | None = None,
                    progress: bool = True) -> PositionEffect:
    """Exact effect (one ablation per position), or the attributed one (`Scores.per_position`) when `scores` are given.

    positions: the positions to probe (default all); the others read NaN in `per_position` and
    `per_pair` and are left out of `per_span`. Probe masks are built per chunk as (L, 1, T) position masks.
    """
    check_layout(pairs)
    spans, per_pair, T = pairs[0].spans, None, pairs[0].length
    probed = torch.arange(T) if positions is None else torch.as_tensor(positions, dtype=torch.long).unique()
    if scores is not None:
        effect = scores.per_position()
    else:
        def masks(idx):  # circuit 0 keeps everything; circuit c > 0 ablates every node at position probed[c - 1]
            keep = torch.ones(len(idx), model.n_layers, 1, T, dtype=torch.bool)
            for row, c in enumerate(idx.tolist()):
                if c:
                    keep[row, ..., probed[c - 1]] = False
            return keep, keep

        lds = finite(_ablate(model, pairs, 1 + len(probed), masks, max_rows=max_rows, desc="position effect",
                             progress=progress), "position_effect", model)
        per_pair = torch.full((T, len(pairs)), float("nan"))
        per_pair[probed] = lds[1:] - lds[:1]
        effect = per_pair.mean(1)
    inside = torch.zeros(T, dtype=torch.bool)
    inside[probed] = True
    return PositionEffect(effect, {s: float(effect[a:b][inside[a:b]].mean()) for s, (a, b) in spans.items()
                                   if inside[a:b].any()}, per_pair)
