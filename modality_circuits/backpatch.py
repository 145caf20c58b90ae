"""Back-patching (METHOD.md section 8): write late-layer residuals of the data positions into an earlier layer.

Run a prompt once and cache the decoder-layer outputs at the data positions (the image tokens
of a visual prompt, the data tokens of a textual one). Run it again and make layer dst output,
at those positions, the cached output of layer src ≥ dst — for w consecutive layer pairs
(src+i, dst+i). src = dst changes nothing. Scored by accuracy over the task's answer set.
"""
from __future__ import annotations

from dataclasses import dataclass

import nnsight
import torch

from . import tasks
from .pairs import Pair, answer_token, batch, chat_text, check_aligned, split
from .stats import CI, bootstrap

Config = tuple[int, int, int]  # (src, dst, window)


def answer_ids(model, pairs: list[Pair]) -> torch.Tensor:
    """First-token ids of every answer of the pairs' task, as generated after the chat prompt."""
    p = pairs[0].prompt
    text = chat_text(model, p)
    ids = {answer_token(model, text, tasks.Prompt(p.task, p.modality, p.data, p.image, p.query, a, p.meta))
           for a in tasks.answer_set(p.task)}
    return torch.tensor(sorted(ids | {q.answer_id for q in pairs}))


def backpatch_logits(model, pairs: list[Pair], configs: list[Config], *, max_rows: int = 64) -> torch.Tensor:
    """(C, P, V) last-position logits of every pair under every back-patching config."""
    check_aligned(pairs)
    L = model.n_layers
    for src, dst, w in configs:
        if not (0 <= dst <= src and src + w <= L and w >= 1):
            raise ValueError(f"config (src={src}, dst={dst}, window={w}) needs 0 <= dst <= src and src + window <= {L}")
    start, end = pairs[0].spans["D"]
    P, inputs = len(pairs), batch([p.inputs for p in pairs])
    with model.trace(inputs):  # cache pass: decoder-layer outputs at the data positions
        cache = nnsight.save([])
        for layer in model.layers():
            h = layer.output
            cache.append((h[0] if isinstance(h, tuple) else h)[:, start:end].clone())
    out = []
    per_chunk = max(1, max_rows // P)
    for c0 in range(0, len(configs), per_chunk):
        chunk = configs[c0:c0 + per_chunk]
        # layer -> [(config index in chunk, src layer)] writes
        writes = {l: [] for l in range(L)}
        for j, (src, dst, w) in enumerate(chunk):
            for i in range(w):
                writes[dst + i].append((j, src + i))
        with model.trace(batch([p.inputs for p in pairs] * len(chunk))):
            for l, layer in enumerate(model.layers()):
                if writes[l]:
                    h = layer.output
                    h = h[0] if isinstance(h, tuple) else h
                    for j, src in writes[l]:
                        h[j * P:(j + 1) * P, start:end] = cache[src].to(h.dtype)
            logits = model.nn.output.logits[:, -1].save()
        out.append(logits.float().cpu().view(len(chunk), P, -1))
    return torch.cat(out)


def correct(logits: torch.Tensor, pairs: list[Pair], answers: torch.Tensor) -> torch.Tensor:
    """(..., P) bool: the highest-scoring answer of the task's answer set is the right one."""
    pred = answers[logits[..., answers].argmax(-1)]
    return pred == torch.tensor([p.answer_id for p in pairs])


def default_configs(n_layers: int, windows=(1, 2), max_configs: int = 120) -> list[Config]:
    """(src, dst, w) with dst < src, over a layer grid thinned so there are at most ~max_configs."""
    stride = 1
    while len(windows) * ((n_layers // stride) ** 2) / 2 > max_configs:
        stride += 1
    grid = range(0, n_layers, stride)
    return [(s, d, w) for w in windows for d in grid for s in grid if d < s and s + w <= n_layers]


@dataclass
class Backpatch:
    config: Config  # chosen on the selection split
    selection: dict  # config -> selection accuracy ("base" for no patching)
    base: CI  # test accuracy without patching
    patched: CI  # test accuracy with the chosen config
    gain: CI  # patched − base on the test split (paired bootstrap)
    n_selection: int
    n_test: int


def backpatch(model, pairs: list[Pair], *, configs: list[Config] | None = None, selection_fraction: float = 0.5,
              resamples: int = 1000, seed: int = 0) -> Backpatch:
    """Choose (src, dst, window) on a selection split, report the accuracy gain on the disjoint test split."""
    selection, test = split(pairs, selection_fraction)
    configs = configs or default_configs(model.n_layers)
    answers = answer_ids(model, pairs)
    base_sel = correct(backpatch_logits(model, selection, [(0, 0, 1)])[0], selection, answers).float().mean()
    acc = correct(backpatch_logits(model, selection, configs), selection, answers).float().mean(-1)
    best = int(acc.argmax())  # ties: the first in the grid
    both = backpatch_logits(model, test, [(0, 0, 1), configs[best]])
    ok = correct(both, test, answers).float()  # (2, P)
    n = len(test)
    return Backpatch(
        configs[best], {"base": float(base_sel), **{str(c): float(a) for c, a in zip(configs, acc)}},
        bootstrap(lambda i: float(ok[0, i].mean()), n, resamples=resamples, seed=seed),
        bootstrap(lambda i: float(ok[1, i].mean()), n, resamples=resamples, seed=seed),
        bootstrap(lambda i: float((ok[1, i] - ok[0, i]).mean()), n, resamples=resamples, seed=seed),
        len(selection), n,
    )
