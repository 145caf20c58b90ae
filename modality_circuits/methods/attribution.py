"""Node attribution with integrated gradients on the merged input embeddings (METHOD.md section 3).

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
from ..execution.checkpoint import Checkpoint, fingerprint
from ..execution.remote import server_body
from .ablation import answers


def _ig_rows(pairs: list[Pair], steps: int) -> dict:
    """Inputs for k+1 rows per pair: p' first (α=0), then p repeated k times (α=1/k..1)."""
    return batch([x for p in pairs for x in [p.cf_inputs] + [p.inputs] * steps])


@server_body
def _ig_session(model, chunks: list, steps: int, per_pair: bool, totals: tuple):
    """One request: a forward+backward over P pairs × (k+1) rows for each chunk (both, rows, answers (P, 2)).

    both: processor outputs of the chunk's p' then p (2P rows); a first pass computes their decoder
    inputs e', e once (the vision tower runs once per prompt). rows: the decoder inputs of the
    P·(k+1) interpolation rows, whose layer-0 input is replaced by x_j = e' + α_j (e − e'), computed
    in float32 and cast to the model's dtype. Head (L, T, H) and neuron (L, T, I) scores (float32)
    summed over pairs are added, chunk by chunk and on the server, to `totals` (None or the running
    sums); returns the new sums and, with per_pair, each chunk's per-pair scores (P, L, units, T).
    """
    L, H, k = model.n_layers, model.n_heads, steps
    root, layers, opts, dtype = model.nn, model.layers(), model.FORWARD, model.dtype
    attn, mlp = [model.head_site(layer) for layer in layers], [model.neuron_site(layer) for layer in layers]
    alpha = (torch.arange(k + 1, dtype=torch.float32) / k).view(1, -1, 1, 1)
    heads_sum, neurons_sum = totals
    with model.session():
        kept = []
        for both, rows, ids in chunks:
            P = len(ids)
            with root.trace(**both, **opts) as embed:
                e0 = layers[0].input.float()  # (2P, T, d): e' rows, then e rows
                embed.stop()
            with root.trace(**rows, **opts):
                e_cf, e = e0[:P].unsqueeze(1), e0[P:].unsqueeze(1)
                a = alpha.to(e.device)
                x = (e_cf + a * (e - e_cf)).to(dtype).flatten(0, 1).detach().requires_grad_(True)  # frozen weights: grads flow via x
                layers[0].input = x
                heads, neurons = [], []
                for i in range(L):  # nnsight serves values in execution order
                    heads.append(attn[i].input)
                    neurons.append(mlp[i].input)
                logits = root.output.logits[:, -1].float().view(P, k + 1, -1)[:, 1:]
                ld = logits.gather(-1, ids.to(logits.device).view(P, 1, 2).expand(P, k, 2))  # LD inline (server body)
                metric = (ld[..., 0] - ld[..., 1]).sum()
                out_h, out_n = [None] * L, [None] * L
                with metric.backward():
                    for i in reversed(range(L)):
                        for out, acts in ((out_n, neurons), (out_h, heads)):
                            act = acts[i].view(P, k + 1, *acts[i].shape[1:])
                            g = acts[i].grad.view(P, k + 1, *acts[i].shape[1:])[:, 1:].float().mean(1)
                            s = (act[:, 0] - act[:, -1]).float() * g  # (P, T, width), float32
                            if out is out_h:
                                s = s.view(*s.shape[:2], H, -1).sum(-1)
                            out[i] = s.detach() if per_pair else s.sum(0).detach()
            del e0, e_cf, e, a, x, heads, neurons, logits, ld, metric  # the next chunk must not hold these too
            chunk_h, chunk_n = torch.stack(out_h), torch.stack(out_n)
            if per_pair:  # (L, P, T, units) -> (P, L, units, T)
                kept.append((chunk_h.permute(1, 0, 3, 2).cpu(), chunk_n.permute(1, 0, 3, 2).cpu()))
                chunk_h, chunk_n = chunk_h.sum(1), chunk_n.sum(1)
            heads_sum = chunk_h if heads_sum is None else heads_sum + chunk_h
            neurons_sum = chunk_n if neurons_sum is None else neurons_sum + chunk_n
        result = nnsight.save((heads_sum, neurons_sum, kept))
    return result


def attribute(model, pairs: list[Pair], steps: int = 5, *, max_rows: int | None = 48, per_pair: bool = False,
              progress: bool = True, checkpoint=None) -> Scores:
    """Integrated-gradient scores of every head and neuron at every position, averaged over pairs.

    Returns Scores with heads (layers, heads, positions) and neurons (layers, d_mlp, positions).
    steps=1 is attribution patching. Pairs are processed in chunks of as many interpolation rows
    (k+1 per pair) as the model's memory budget allows, at most `max_rows`, one backward per chunk;
    sums stream across chunks in float32.
    per_pair=True also keeps every pair's scores (Scores.per_pair, for bootstrapping; small models only).
    Remote: `model.chunks_per_request` chunks per request, only the running sums come back.
    checkpoint: a file that keeps the sums after every request; a run with the same model, pairs
    and settings resumes from it (a file of another run is replaced).
    """
    check_layout(pairs)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    per_chunk = max(1, budget.rows(model, pairs[0].length, backward=True, max_rows=max_rows) // (steps + 1))
    chunks = requests.chunked(pairs, per_chunk)
    state = {"done": 0, "heads": None, "neurons": None, "kept": []}
    store = None
    if checkpoint is not None:
        store = Checkpoint(checkpoint, fingerprint(
            "attribute", model.name, model.n_layers, model.n_heads, model.d_mlp, steps, per_pair, per_chunk,
            [(p.inputs, p.cf_inputs, p.answer_id, p.cf_answer_id) for p in pairs]))
        state = store.load() or state
    for group in requests.requests(model, chunks[state["done"]:], desc=f"attribute k={steps}", progress=progress,
                                   done=state["done"]):
        work = [(model.prepare(batch([p.cf_inputs for p in chunk] + [p.inputs for p in chunk])),
                 model.prepare(model.decoder_inputs(_ig_rows(chunk, steps))), answers(chunk)) for chunk in group]
        h, n, kept = model.call(_ig_session, work, steps, per_pair, (state["heads"], state["neurons"]))
        state = {"done": state["done"] + len(group), "heads": h, "neurons": n, "kept": state["kept"] + list(kept)}
        if store is not None:
            store.save(state)
    heads, neurons, n = state["heads"], state["neurons"], len(pairs)
    scores = Scores((heads / n).permute(0, 2, 1).contiguous().cpu(), (neurons / n).permute(0, 2, 1).contiguous().cpu(),
                    dict(pairs[0].spans), model.name, n, {"steps": steps})
    if per_pair:
        scores.per_pair = (torch.cat([h for h, _ in state["kept"]]), torch.cat([n for _, n in state["kept"]]))
    return scores
