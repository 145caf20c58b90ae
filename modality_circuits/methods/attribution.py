"""Node attribution with integrated gradients on the merged input embeddings (docs/method.md section 3).

For α_j = j/k the decoder input is x_j = e' + α_j (e − e'), where e, e' are the
decoder inputs of p and p' after image features were merged in, so image positions
are interpolated too. The score of node n is Σ_dims (a_n(p') − a_n(p)) · mean_j ∂LD/∂a_n|x_j.
"""
from __future__ import annotations

import nnsight
import torch

from ..circuits.circuit import Scores
from ..data.pairs import Pair, batch, check_layout
from ..execution import budget, requests
from ..execution.bodies import add_to_output, embed_pass, feed_stack, logit_diff
from ..execution.checkpoint import Checkpoint, fingerprint
from ..execution.checks import finite
from ..execution.remote import server_body
from .ablation import answers


def _ig_rows(pairs: list[Pair], steps: int) -> dict:
    """Inputs for k+1 rows per pair: p' first (α=0), then p repeated k times (α=1/k..1)."""
    return batch([x for p in pairs for x in [p.cf_inputs] + [p.inputs] * steps])


@server_body
def _ig_session(model, chunks: list, steps: int, per_pair, totals: tuple, absolute: bool, hold):
    """One request: a forward+backward over P pairs × (k+1) rows for each chunk (both, rows, answers (P, 2)).

    both: processor outputs of the chunk's p' then p (2P rows); a first pass computes their decoder
    inputs e', e once (the vision tower runs once per prompt). rows: the decoder inputs of the
    P·(k+1) interpolation rows, whose layer-0 input is replaced by x_j = e' + α_j (e − e'), computed
    in float32 and cast to the model's dtype. Head (L, T, H) and neuron (L, T, I) scores (float32)
    and their squares are added to `totals` (four running sums or Nones) one pair at a time, in the
    pairs' order, on the server: the sums are the same bits however the pairs are cut into chunks
    (docs/reproducibility.md). Returns the new sums and each chunk's per-pair
    scores: all of them (per_pair=True, (P, L, units, T)), those at the flat indices of the Scores
    layout per_pair=(head index, neuron index) ((P, n_kept) each), or none (per_pair=False).
    absolute: score |Δa · mean ∇| per element, summed over a head's elements (the reference's head score);
    hold: None, or a (T,) bool mask of positions kept at e in rows 1..k, where the gradient is taken (the reference's
    "tokens" interpolation); row 0 is p' untouched, so Δa still compares the two prompts.
    Families that add visual features after the first decoder layers (`Adapter.injections`, Qwen3-VL's
    DeepStack): the first pass also reads them, g' and g, and row j adds g' + α_j (g − g') to those layers'
    outputs; a per-token input beside e (`Adapter.token_inputs`, Gemma 4's per-layer embeddings) is read too,
    q' and q, and row j's decoder stack reads x_j and q' + α_j (q − q'), so every input that differs between p and
    p' moves along the path. Mixture-of-experts layers: every
    row is routed as its pair's p (the α=1 row), the routing weights held constant (docs/families-2026.md).
    """
    L, H, k = model.n_layers, model.n_heads, steps
    root, layers, opts, dtype = model.nn, model.layers(), model.FORWARD, model.dtype
    attn, mlp = [model.head_site(layer) for layer in layers], [model.neuron_site(layer) for layer in layers]
    heads_at, width = model.layer_heads, (H, model.d_mlp)  # per-layer head counts; Scores pad to the widest
    moe = [model.experts_of(layer) for layer in layers]  # fused experts (None: dense), routing held at p's
    alpha = (torch.arange(k + 1, dtype=torch.float32) / k).view(1, -1, 1, 1)
    heads_sum, neurons_sum, heads_sq, neurons_sq = totals
    keep_all, index = per_pair is True, per_pair if isinstance(per_pair, tuple) else None
    stack, inject, keys = model.decoder_stack(), model.injects(chunks[0][0]), model.adapter.injections
    token_key = model.adapter.token_inputs  # a per-token input beside e (Gemma 4's per-layer embeddings): moves with e
    with model.session():
        kept = []
        for both, rows, ids in chunks:
            P = len(ids)
            e0, g0, q0 = embed_pass(root, both, opts, layers, stack, keys, inject, torch.float32, token_key=token_key)
            with root.trace(**rows, **opts):
                e_cf, e = e0[:P].unsqueeze(1), e0[P:].unsqueeze(1)
                a = alpha.to(e.device)
                x = e_cf + a * (e - e_cf)
                if token_key:  # the per-token input moves along the same path: (P, k+1, T, ...)
                    q_cf, q = q0[:P].unsqueeze(1), q0[P:].unsqueeze(1)
                    aq = a.view(*a.shape, *[1] * (q.dim() - a.dim()))
                    q_rows = q_cf + aq * (q - q_cf)
                if inject:  # the injected features move along the same path: (n, P·(k+1), T, d)
                    g_cf, g = g0[:, :P].unsqueeze(2), g0[:, P:].unsqueeze(2)
                    g_rows = g_cf + a.unsqueeze(0) * (g - g_cf)
                if hold is not None:  # these positions are p's where the gradient is taken (rows 1..k), as the
                    # reference's code had them; row 0 stays p' untouched, so Δa = a(p') − a(p) of the two prompts
                    held = hold.to(e.device).view(1, 1, -1, 1) & (a > 0)  # (1, k+1, T, 1)
                    x = torch.where(held, e, x)
                    if inject:
                        g_rows = torch.where(held.unsqueeze(0), g, g_rows)
                    if token_key:
                        q_rows = torch.where(held.view(*held.shape, *[1] * (q.dim() - held.dim())), q, q_rows)
                if inject:
                    g_rows = g_rows.to(dtype).flatten(1, 2)  # (n, P·(k+1), T, d) in the model's dtype
                x = x.to(dtype).flatten(0, 1).detach().requires_grad_(True)  # frozen weights: grads flow via x
                if token_key:
                    feed_stack(stack, x, token_key, q_rows.to(dtype).flatten(0, 1))
                layers[0].input = x
                heads, neurons = [], []
                for i in range(L):  # nnsight serves values in execution order
                    heads.append(attn[i].input)
                    if moe[i] is not None:  # every row routed as its pair's p (its α=1 row): docs/families-2026.md
                        (h, top, w), kw = moe[i].inputs
                        top, w = (t.view(P, k + 1, -1, t.shape[-1])[:, -1:].expand(-1, k + 1, -1, -1).reshape(t.shape)
                                  for t in (top, w))
                        moe[i].inputs = ((h, top, w.detach()), kw)
                    neurons.append(mlp[i].input)
                    if inject and i < len(g_rows):
                        add_to_output(layers[i], g_rows[i])
                logits = root.output.logits[:, -1].view(P, k + 1, -1)[:, 1:]
                metric = logit_diff(logits, ids.view(P, 1, 2).expand(P, k, 2)).sum()
                # per kind (0 heads, 1 neurons) and layer: sum over pairs, sum of squares, per-pair values if kept
                sums, squares, each = [[None] * L, [None] * L], [[None] * L, [None] * L], [[None] * L, [None] * L]
                with metric.backward():
                    for i in reversed(range(L)):
                        for j, acts in ((1, neurons), (0, heads)):
                            act = acts[i].view(P, k + 1, x.shape[1], -1)  # a sparse layer's site is (rows·T, E·I)
                            g = acts[i].grad.view(P, k + 1, x.shape[1], -1)[:, 1:].float().mean(1)
                            s = ((act[:, 0] - act[:, -1]).float() * g).detach().to(x.device)  # (P, T, width), float32,
                            # gathered on the input's device (layers may sit on several devices: device_map)
                            if absolute:
                                s = s.abs()
                            if j == 0:
                                s = s.view(*s.shape[:2], heads_at[i], -1).sum(-1)  # (P, T, heads)
                            s = torch.nn.functional.pad(s, (0, width[j] - s.shape[-1]))  # layers with fewer units
                            run, run_sq = (heads_sum, heads_sq) if j == 0 else (neurons_sum, neurons_sq)
                            run, run_sq = ((torch.zeros_like(s[0]), torch.zeros_like(s[0])) if run is None else  # no pair yet
                                           (run[i].to(s.device), run_sq[i].to(s.device)))
                            for one in s:  # pair by pair, in order: no sum depends on the chunks' composition
                                run, run_sq = run + one, run_sq + one * one
                            sums[j][i], squares[j][i] = run, run_sq
                            if keep_all or index is not None:
                                each[j][i] = s
            del e0, e_cf, e, a, x, heads, neurons, logits, metric  # the next chunk must not hold these too
            if inject:
                del g0, g_cf, g, g_rows
            if token_key:
                del q0, q_cf, q, q_rows
            if keep_all:  # (L, P, T, units) -> (P, L, units, T)
                kept.append(tuple(torch.stack(v).permute(1, 0, 3, 2).cpu() for v in each))
            elif index is not None:  # (P, n_kept) at flat indices of the (L, units, T) layout
                kept.append(tuple(torch.stack(v).permute(1, 0, 3, 2).flatten(1)[:, i.to(v[0].device)].cpu()
                                  for v, i in zip(each, index)))
            heads_sum, neurons_sum = (torch.stack(v) for v in sums)  # (L, T, units): the running sums so far
            heads_sq, neurons_sq = (torch.stack(v) for v in squares)
        result = nnsight.save((heads_sum, neurons_sum, heads_sq, neurons_sq, kept))
    return result


HEAD_SCORES = ("signed_sum", "abs_elementwise")
INTERPOLATIONS = ("merged", "tokens")


def attribute(model, pairs: list[Pair], steps: int = 5, *, max_rows: int | None = None, per_pair: bool = False,
              progress: bool = True, checkpoint=None, head_score: str = "signed_sum",
              interpolate: str = "merged") -> Scores:
    """Integrated-gradient scores of every head and neuron at every position, averaged over pairs.

    Returns Scores with heads (layers, heads, positions) and neurons (layers, d_mlp, positions).
    steps=1 is attribution patching. Pairs are processed in chunks of as many interpolation rows
    (k+1 per pair) as the model's memory budget allows, at most `max_rows`, one backward per chunk;
    sums stream across chunks in float32.
    per_pair=True also keeps every pair's scores (Scores.per_pair, for bootstrapping; small models only);
    per_pair=(head index, neuron index) keeps them only at those flat indices of the (L, units, T)
    layouts (Scores.per_pair (P, n) each, Scores.kept the indices). Scores.square_sums always holds
    Σ_p score², which bounds what any resample of the pairs can give a node (circuits/candidates.py).
    Remote: `model.chunks_per_request` chunks per request, only the running sums come back.
    checkpoint: a file that keeps the sums after every request; a run with the same model, pairs
    and settings resumes from it (a file of another run is replaced).
    head_score: "signed_sum" (ours: Σ over a head's elements of Δa · mean ∇, ranked by |mean over pairs|) or
    "abs_elementwise" (the reference code's: |Δa · mean ∇| per element, summed; neurons |·| too).
    interpolate: "merged" (ours: the decoder input after image features are merged, image positions
    included) or "tokens" (the reference code's: image positions stay p's at every step where the gradient is
    taken; Δa = a(p') − a(p) still comes from the two prompts). docs/method.md 11.
    """
    check_layout(pairs)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if head_score not in HEAD_SCORES or interpolate not in INTERPOLATIONS:
        raise ValueError(f"head_score must be one of {HEAD_SCORES} and interpolate one of {INTERPOLATIONS}; "
                         f"got {head_score!r}, {interpolate!r}")
    hold = model.image_mask(pairs[0].inputs["input_ids"][0]).cpu() if interpolate == "tokens" else None
    per_chunk = max(1, budget.rows(model, pairs[0].length, backward=True, max_rows=max_rows) // (steps + 1))
    state = {"done": 0, "heads": None, "neurons": None, "heads_sq": None, "neurons_sq": None, "kept": []}  # done: pairs
    store = None
    if checkpoint is not None:  # keyed on what the sums depend on; never on the chunk size (free memory)
        store = Checkpoint(checkpoint, fingerprint(
            "attribute", model.name, model.weights_id, model.n_layers, model.n_heads, model.d_mlp, steps, head_score, interpolate,
            per_pair if isinstance(per_pair, tuple) else bool(per_pair),
            [(p.inputs, p.cf_inputs, p.answer_id, p.cf_answer_id) for p in pairs]))
        state = store.load() or state
    chunks = requests.chunked(pairs[state["done"]:], per_chunk)
    for group, send in requests.requests(model, chunks, desc=f"attribute k={steps}", progress=progress,
                                         done=len(requests.chunked(pairs[:state["done"]], per_chunk))):
        work = [(model.prepare(batch([p.cf_inputs for p in chunk] + [p.inputs for p in chunk])),
                 model.prepare(model.decoder_inputs(_ig_rows(chunk, steps))), answers(chunk)) for chunk in group]
        totals = (state["heads"], state["neurons"], state["heads_sq"], state["neurons_sq"])
        h, n, hq, nq, kept = model.call(_ig_session, send(work), steps, per_pair, totals, head_score == "abs_elementwise", hold)
        for sums in (h, n):  # checked before a checkpoint keeps them
            finite(sums, "attribute", model)
        state = {"done": state["done"] + sum(map(len, group)), "heads": h, "neurons": n, "heads_sq": hq, "neurons_sq": nq,
                 "kept": state["kept"] + list(kept)}
        if store is not None:
            store.save(state)
    n = len(pairs)

    def layout(t):  # (L, T, units) -> (L, units, T)
        return t.permute(0, 2, 1).contiguous().cpu()

    meta = {"steps": steps, "head_score": head_score, "interpolate": interpolate}
    scores = Scores(layout(state["heads"] / n), layout(state["neurons"] / n), dict(pairs[0].spans), model.name, n,
                    meta, square_sums=(layout(state["heads_sq"]), layout(state["neurons_sq"])),
                    task=pairs[0].prompt.task, modality=pairs[0].prompt.modality)
    if per_pair is True or isinstance(per_pair, tuple):
        scores.per_pair = (torch.cat([h for h, _ in state["kept"]]), torch.cat([n for _, n in state["kept"]]))
        scores.kept = per_pair if isinstance(per_pair, tuple) else None
    return scores
