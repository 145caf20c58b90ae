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

from ..circuits.stats import CI, bootstrap
from ..data import tasks
from ..data.pairs import Pair, answer_token, batch, chat_text, check_layout, split
from ..execution import requests
from ..execution.remote import server_body

Config = tuple[int, int, int]  # (src, dst, window)


def answer_ids(model, pairs: list[Pair]) -> torch.Tensor:
    """First-token ids of every answer of the pairs' task, as generated after the chat prompt."""
    p = pairs[0].prompt
    text = chat_text(model, p)
    ids = {answer_token(model, text, tasks.Prompt(p.task, p.modality, p.data, p.image, p.query, a, p.meta))
           for a in tasks.answer_set(p.task)}
    return torch.tensor(sorted(ids | {q.answer_id for q in pairs}))


@server_body
def _backpatch_session(model, chunks: list, inputs: dict, span: tuple, ids) -> list:
    """One request: a cache pass, then one pass per chunk (n, writes); the cache never leaves the server.

    writes[layer] lists (config j in the chunk, src layer): rows j·P..(j+1)·P get, at `layer`'s output
    and the data positions, the cached output of `src`. Returns each chunk's (n, P, V) last-position
    logits (float32), or only the columns `ids`.
    """
    start, end = span
    root, layers = model.nn, model.layers()
    tuple_out = model.adapter.layer_returns_tuple
    with model.session():
        with root.trace(**inputs):  # cache pass: decoder-layer outputs at the data positions
            cache = []
            for layer in layers:
                h = layer.output[0] if tuple_out else layer.output
                cache.append(h[:, start:end].clone())
        out = []
        for n, writes in chunks:
            P = len(inputs["input_ids"])
            rows = {key: torch.cat([inputs[key]] * n) for key in inputs}
            with root.trace(**rows):
                for l in range(len(layers)):
                    if writes[l]:
                        h = layers[l].output[0] if tuple_out else layers[l].output
                        for j, src in writes[l]:
                            h[j * P:(j + 1) * P, start:end] = cache[src].to(h.dtype)
                logits = root.output.logits[:, -1]
            logits = logits.float()
            if ids is not None:
                logits = logits[:, ids.to(logits.device)]
            out.append(logits.cpu().view(n, P, -1))
            del h, logits  # the next chunk must not hold these too
        result = nnsight.save(out)
    return result


def backpatch_logits(model, pairs: list[Pair], configs: list[Config], *, max_rows: int = 64, ids=None) -> torch.Tensor:
    """(C, P, V) last-position logits of every pair under every back-patching config.

    ids: token ids to keep (e.g. the task's answer set): (C, P, len(ids)), so that remote runs send
    back a few logits instead of the vocabulary. Remote: `model.chunks_per_request` chunks of configs
    per request, each request one session whose first pass caches the residuals on the server.
    """
    check_layout(pairs)
    L = model.n_layers
    for src, dst, w in configs:
        if not (0 <= dst <= src and src + w <= L and w >= 1):
            raise ValueError(f"config (src={src}, dst={dst}, window={w}) needs 0 <= dst <= src and src + window <= {L}")
    P, inputs = len(pairs), model.prepare(batch([p.inputs for p in pairs]))
    ids = None if ids is None else torch.as_tensor(ids, dtype=torch.long)
    chunks = []
    for chunk in requests.chunked(configs, max(1, max_rows // P)):
        writes = [[] for _ in range(L)]  # layer -> [(config index in chunk, src layer)]
        for j, (src, dst, w) in enumerate(chunk):
            for i in range(w):
                writes[dst + i].append((j, src + i))
        chunks.append((len(chunk), writes))
    return torch.cat(requests.run(model, _backpatch_session, chunks, inputs, pairs[0].spans["D"], ids))


def _correct_among(logits: torch.Tensor, pairs: list[Pair], answers: torch.Tensor) -> torch.Tensor:
    """(..., P) bool: of the task's answer set (logits restricted to its columns `answers`), the right one scores highest."""
    return answers[logits.argmax(-1)] == torch.tensor([p.answer_id for p in pairs])


def default_configs(n_layers: int, windows=(1, 2), max_configs: int = 120) -> list[Config]:
    """(src, dst, w) with dst < src, over a layer grid thinned so there are at most ~max_configs."""
    stride = 1
    while len(windows) * ((n_layers // stride) ** 2) / 2 > max_configs:
        stride += 1
    grid = range(0, n_layers, stride)
    return [(s, d, w) for w in windows for d in grid for s in grid if d < s and s + w <= n_layers]


@dataclass
class Backpatch:
    """The chosen back-patching configuration and its test-split accuracies."""

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
    # only the answer-set logits travel: argmax over them is what `correct` reads
    base_sel = _correct_among(backpatch_logits(model, selection, [(0, 0, 1)], ids=answers)[0], selection, answers)
    base_sel = base_sel.float().mean()
    acc = _correct_among(backpatch_logits(model, selection, configs, ids=answers), selection, answers).float().mean(-1)
    best = int(acc.argmax())  # ties: the first in the grid
    both = backpatch_logits(model, test, [(0, 0, 1), configs[best]], ids=answers)
    ok = _correct_among(both, test, answers).float()  # (2, P)
    n = len(test)
    return Backpatch(
        configs[best], {"base": float(base_sel), **{str(c): float(a) for c, a in zip(configs, acc)}},
        bootstrap(lambda i: float(ok[0, i].mean()), n, resamples=resamples, seed=seed),
        bootstrap(lambda i: float(ok[1, i].mean()), n, resamples=resamples, seed=seed),
        bootstrap(lambda i: float((ok[1, i] - ok[0, i]).mean()), n, resamples=resamples, seed=seed),
        len(selection), n,
    )
