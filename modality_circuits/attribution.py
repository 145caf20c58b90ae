"""Node attribution with integrated gradients on the merged input embeddings (METHOD.md section 3).

For α_j = j/k the decoder input is x_j = e' + α_j (e − e'), where e, e' are the
decoder inputs of p and p' after image features were merged in, so image positions
are interpolated too. The score of node n is Σ_dims (a_n(p') − a_n(p)) · mean_j ∂LD/∂a_n|x_j.
"""
from __future__ import annotations

import nnsight
import torch
from tqdm.auto import tqdm

from .circuit import Scores
from .pairs import Pair, batch, check_aligned


def _ig_rows(pairs: list[Pair], steps: int) -> dict:
    """Inputs for k+1 rows per pair: p' first (α=0), then p repeated k times (α=1/k..1)."""
    return batch([x for p in pairs for x in [p.cf_inputs] + [p.inputs] * steps])


def _ig_trace(model, inputs: dict, answers: torch.Tensor, steps: int, per_pair: bool = False):
    """One forward+backward over P pairs × (k+1) rows.

    Returns head (L, T, H) and neuron (L, T, I) scores summed over pairs, or (L, P, T, ·) with per_pair.
    """
    L, H, k = model.n_layers, model.n_heads, steps
    alpha = torch.arange(k + 1, dtype=model.hf_model.dtype, device=model.device) / k
    with model.trace(inputs):
        layers = model.layers()
        h = layers[0].input
        P = h.shape[0] // (k + 1)
        h = h.view(P, k + 1, *h.shape[1:])
        e_cf, e = h[:, :1], h[:, -1:]
        x = (e_cf + alpha.view(1, -1, 1, 1) * (e - e_cf)).flatten(0, 1).detach().requires_grad_(True)
        layers[0].input = x
        heads, neurons = [], []
        for layer in layers:  # nnsight serves values in execution order
            heads.append(model.attn_out(layer).input)
            neurons.append(model.mlp_out(layer).input)
        logits = model.nn.output.logits[:, -1].view(P, k + 1, -1)[:, 1:]
        ld = logits.gather(-1, answers.view(P, 1, 2).expand(P, k, 2))
        metric = (ld[..., 0] - ld[..., 1]).sum()
        out = nnsight.save({"heads": [None] * L, "neurons": [None] * L})
        with metric.backward():
            for i in reversed(range(L)):
                for key, acts in (("neurons", neurons), ("heads", heads)):
                    a = acts[i].view(P, k + 1, *acts[i].shape[1:])
                    g = acts[i].grad.view(P, k + 1, *acts[i].shape[1:])[:, 1:].mean(1)
                    s = (a[:, 0] - a[:, -1]) * g  # (P, T, width)
                    if key == "heads":
                        s = s.view(*s.shape[:2], H, -1).sum(-1)
                    out[key][i] = s.detach() if per_pair else s.sum(0).detach()
    return torch.stack(out["heads"]), torch.stack(out["neurons"])


def attribute(model, pairs: list[Pair], steps: int = 5, *, max_rows: int = 48, per_pair: bool = False,
              progress: bool = True) -> Scores:
    """Integrated-gradient scores of every head and neuron at every position, averaged over pairs.

    Returns Scores with heads (layers, heads, positions) and neurons (layers, d_mlp, positions).
    steps=1 is attribution patching. Pairs are processed in chunks of at most `max_rows`
    interpolation rows (k+1 per pair), one backward per chunk; sums stream across chunks.
    per_pair=True also keeps every pair's scores (Scores.per_pair, for bootstrapping; small models only).
    """
    check_aligned(pairs)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    per_chunk = max(1, max_rows // (steps + 1))
    heads = neurons = 0
    kept = []
    chunks = range(0, len(pairs), per_chunk)
    for start in tqdm(chunks, desc=f"attribute k={steps}", disable=not progress, leave=False):
        chunk = pairs[start:start + per_chunk]
        answers = torch.tensor([[p.answer_id, p.cf_answer_id] for p in chunk], device=model.device)
        h, n = _ig_trace(model, _ig_rows(chunk, steps), answers, steps, per_pair)
        if per_pair:  # (L, P, T, units) -> (P, L, units, T)
            kept.append((h.permute(1, 0, 3, 2).cpu(), n.permute(1, 0, 3, 2).cpu()))
            h, n = h.sum(1), n.sum(1)
        heads, neurons = heads + h, neurons + n
    n = len(pairs)
    scores = Scores((heads / n).permute(0, 2, 1).contiguous().cpu(), (neurons / n).permute(0, 2, 1).contiguous().cpu(),
                    dict(pairs[0].spans), model.name, n, {"steps": steps})
    if per_pair:
        scores.per_pair = (torch.cat([h for h, _ in kept]), torch.cat([n for _, n in kept]))
    return scores
