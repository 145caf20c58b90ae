"""Exact single-node patching: the ground truth that attribution approximates (docs/method.md section 3).

Every trace puts the counterfactual rows p' first and unpatched, so at every layer their
activations are a(p'); each node's rows of p copy that node's value from them in the same forward.
"""
from __future__ import annotations

import nnsight
import torch

from ..data.pairs import Pair, batch, check_layout
from ..execution import budget, requests
from ..execution.bodies import add_to_output, embed_pass, feed_stack, logit_diff, repeat_rows, rerun_from, route_as_held
from ..execution.checks import finite
from ..execution.remote import server_body
from .ablation import answers, logit_diffs


@server_body
def _patch_session(model, chunks: list, both: dict, ids: torch.Tensor, base: torch.Tensor, vision: tuple) -> list:
    """One request: for each chunk (n, plan), the mean over pairs of LD(p with one node patched) − LD(p), (n,).

    both: processor outputs of the P pairs' p' then p; a first pass computes their decoder inputs once
    (the vision tower runs once per prompt). Rows: P p' rows, then P rows of p per node; plan[layer]
    lists (0 heads | 1 neurons, rows, src, pos, unit) index tensors of the writes at that layer.
    Mixture-of-experts layers: the first pass runs on to read p's routing, and every row is routed as its p.
    """
    P = len(ids)
    root, layers, opts = model.nn, model.layers(), model.FORWARD
    sites = [(model.head_site(layer), model.neuron_site(layer)) for layer in layers]
    heads_at, moe = model.layer_heads, [model.experts_of(layer) for layer in layers]
    decoder, stack, keys, inject, token_key = rerun_from(model, both, vision)
    with model.session():
        e, g, q, held = embed_pass(root, both, opts, layers, stack, keys, inject, moe=moe, token_key=token_key)
        effects = []
        for n, plan in chunks:
            rows_in = {key: repeat_rows(value, P, n) for key, value in decoder.items()}
            a = view = None  # a chunk of padding units only (a narrower layer) writes nothing
            with root.trace(**rows_in, **opts):
                if q is not None:  # each row's own prompt's per-token input (Gemma 4's per-layer embeddings)
                    feed_stack(stack, repeat_rows(e, P, n), token_key, repeat_rows(q, P, n))
                layers[0].input = repeat_rows(e, P, n)
                for i in range(len(sites)):
                    if moe[i] is not None:  # every row routed as its prompt p, p' rows too; after the heads' writes
                        writes = [w for w in plan[i] if w[0] == 0] + [(2,)] + [w for w in plan[i] if w[0] == 1]
                    else:
                        writes = plan[i]
                    for write in writes:  # heads, (routing,) neurons: execution order
                        if write[0] == 2:
                            route_as_held(moe[i], held[i], P, n)
                            continue
                        j, rows, src, t, u = write
                        a = sites[i][j].input.clone()
                        # (rows, T, heads, width) or (rows, T, neurons); a sparse layer's site is (rows·T, E·I)
                        view = a.view(len(a), e.shape[1], heads_at[i], -1) if j == 0 else a.view(-1, e.shape[1], a.shape[-1])
                        rows, src, t, u = rows.to(a.device), src.to(a.device), t.to(a.device), u.to(a.device)
                        view[rows, t, u] = view[src, t, u]
                        sites[i][j].input = a
                    if inject and i < len(g):  # each row gets its own prompt's injected features
                        add_to_output(layers[i], repeat_rows(g[i], P, n))
                ld = logit_diff(root.output.logits[P:, -1], ids.repeat(n, 1))
            effects.append((ld.cpu().view(n, P) - base).mean(1))
            del a, view  # the next chunk must not hold these too
        result = nnsight.save(effects)
    return result


def _plan(model, chunk: list, P: int) -> list:
    """Per layer, the (kind, rows, src, pos, unit) writes of the nodes of `chunk`; node c owns rows P + c·P .. P + (c+1)·P."""
    kinds = [k for k, *_ in chunk]
    layer_of, unit, pos = (torch.tensor([n[i] for n in chunk]) for i in (1, 2, 3))
    plan = []
    for i in range(model.n_layers):
        writes = []
        for j, kind in enumerate(("head", "neuron")):
            units = (model.layer_heads, model.layer_neurons)[j][i]  # padding units of a narrower layer: no write, effect 0
            js = torch.tensor([c for c, k in enumerate(kinds) if k == kind and layer_of[c] == i and unit[c] < units],
                              dtype=torch.long)
            if len(js):
                rows = (P + js[:, None] * P + torch.arange(P)).flatten()
                writes.append((j, rows, torch.arange(P).repeat(len(js)), pos[js].repeat_interleave(P),
                               unit[js].repeat_interleave(P)))
        plan.append(writes)
    return plan


def exact_patching(model, pairs: list[Pair], nodes: list[tuple[str, int, int, int]], *, max_rows: int | None = None,
                   progress: bool = True) -> torch.Tensor:
    """(N,) mean over pairs of LD(p with a_n := a_n(p')) − LD(p) for nodes ("head"|"neuron", layer, unit, pos)."""
    check_layout(pairs)
    base = logit_diffs(model, pairs)
    size = budget.rows(model, pairs[0].length, max_rows=max_rows)
    total = torch.zeros(len(nodes))
    for start, part in zip(range(0, len(pairs), max(1, size // 2)), requests.chunked(pairs, max(1, size // 2))):
        P = len(part)
        both = model.prepare(batch([p.cf_inputs for p in part] + [p.inputs for p in part]))
        work = [(len(chunk), _plan(model, chunk, P)) for chunk in requests.chunked(nodes, max(1, size // P - 1))]
        out = requests.run(model, _patch_session, work, both, answers(part), base[start:start + P],
                           model.adapter.vision_inputs, desc="exact patching", progress=progress)
        total += torch.cat(out) * (P / len(pairs))  # mean over this pair chunk, weighted by its share
    return finite(total, "exact_patching", model)
