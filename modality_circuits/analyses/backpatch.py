"""Back-patching (docs/method.md section 8): write late-layer residuals of the data positions into an earlier layer.

Run a prompt once and cache the decoder-layer outputs at the data positions (the image tokens
of a visual prompt, the data tokens of a textual one). Run it again and make layer dst output,
at those positions, the cached output of layer src ≥ dst — for w consecutive layer pairs
(src+i, dst+i). src = dst changes nothing. Scored by accuracy over the task's answer set (the right answer
scores highest among the task's answers; the study's choice), or top-1 over the vocabulary (`accuracy="top1"`).

A model with prefix-LM attention (`Adapter.attention` "prefix") is refused (`refusal`) unless
allow_prefix_attention=True: its data positions see the question.
"""
from __future__ import annotations

from dataclasses import dataclass

import nnsight
import torch

from ..circuits.stats import CI, bootstrap_mean
from ..data import tasks
from ..data.pairs import Pair, answer_token, batch, chat_text, check_layout, split
from ..execution import budget, requests
from ..execution.bodies import decoder_inputs, feed_stack, rerun_from
from ..execution.checks import finite
from ..execution.remote import server_body

Config = tuple[int, int, int]  # (src, dst, window)


def refusal(model) -> str | None:
    """Why back-patching cannot be read on `model` (docs/method.md section 13), or None when it can."""
    if model.adapter.attention != "prefix":
        return None
    return (f"{model.name} has prefix-LM attention: its data positions attend to the question, and the question to "
            "them, both ways, so the cached late-layer residuals at the data positions already carry task "
            "information; the method's argument that back-patching leaks no task information (docs/method.md "
            "section 8) fails, and a gain would no longer show that late layers hold unused data")


def _refuse(model, allow_prefix_attention: bool) -> None:
    """Raise the refusal, before any work, unless the caller explicitly allows prefix attention."""
    why = refusal(model)
    if why and not allow_prefix_attention:
        raise ValueError(f"back-patching refused: {why}. Pass allow_prefix_attention=True to run it anyway "
                         "(the mechanics are the same; the reading of a gain is not)")


def answer_ids(model, pairs: list[Pair]) -> torch.Tensor:
    """First-token ids of every answer of the pairs' task, as generated after the chat prompt."""
    p = pairs[0].prompt
    text = chat_text(model, p)
    ids = {answer_token(model, text, tasks.Prompt(p.task, p.modality, p.data, p.image, p.query, a, p.meta))
           for a in tasks.answer_set(p.task)}
    return torch.tensor(sorted(ids | {q.answer_id for q in pairs}))


@server_body
def _backpatch_session(model, chunks: list, inputs: dict, span: tuple, ids, vision: tuple, skip_below: tuple) -> list:
    """One request: a cache pass, then one pass per chunk (n, writes, dst); the cache never leaves the server.

    The cache pass keeps every decoder layer's output at the data positions, the decoder input e, and
    the full output of layer d − 1 for each d in `skip_below`. writes[layer] lists (config j in the
    chunk, src layer): rows j·P..(j+1)·P get, at `layer`'s output and the data positions, the cached
    output of `src`. All configs of a chunk share dst: below it every row computes exactly what the
    cache pass did, so those layers are skipped and give the cached output (for dst in `skip_below`),
    or the pass starts from e (the vision tower runs once per prompt). With injected visual features
    (`Adapter.injections`) the cached and written values are the stream the next layer reads, features
    included. Returns each chunk's
    (n, P, V) last-position logits (float32), or only the columns `ids` and, last, the maximum over the vocabulary.
    """
    start, end = span
    root, layers, opts = model.nn, model.layers(), model.FORWARD
    tuple_out = model.adapter.layer_returns_tuple
    P = len(inputs["input_ids"])
    decoder, stack, keys, inject, token_key = rerun_from(model, inputs, vision)
    with model.session():
        with root.trace(**inputs, **opts):  # cache pass
            e, g, q = decoder_inputs(layers, stack, keys, inject, token_key=token_key)  # (P, T, d); g, q or None
            cache, below = [], {}
            for i, layer in enumerate(layers):
                h = layer.output[0] if tuple_out else layer.output
                if inject and i < len(g):  # the stream layer i + 1 reads: the model adds g[i] after layer i
                    h = h + g[i].to(h.device)
                cache.append(h[:, start:end].clone())
                if i + 1 in skip_below:
                    below[i + 1] = h.clone()
        out = []
        for n, writes, dst in chunks:
            rows = {key: torch.cat([value] * n) for key, value in decoder.items()}
            with root.trace(**rows, **opts):
                if q is not None:  # the layers read the prompts' own per-token input (Gemma 4's per-layer embeddings)
                    feed_stack(stack, torch.cat([e] * n), token_key, torch.cat([q] * n))
                if dst in skip_below:
                    same = torch.cat([below[dst]] * n)
                    for i in range(dst):  # layers below dst: only the last one's output is read
                        layers[i].skip(same)
                else:
                    layers[0].input = torch.cat([e] * n)
                for i in range(dst if dst in skip_below else 0, len(layers)):
                    add = inject and i < len(g)  # these rows carry no image: their injected features are added here
                    if writes[i] or add:
                        h = layers[i].output[0] if tuple_out else layers[i].output
                        if add:
                            h = h + torch.cat([g[i]] * n).to(h.device)
                        for j, src in writes[i]:
                            h[j * P:(j + 1) * P, start:end] = cache[src].to(h.device, h.dtype)
                        if add:
                            layers[i].output = h
                logits = root.output.logits[:, -1].float()
            if ids is not None:  # the answer columns, then the vocabulary's maximum (top-1 accuracy reads it)
                logits = torch.cat([logits[:, ids.to(logits.device)], logits.max(-1, keepdim=True).values], -1)
            out.append(logits.cpu().view(n, P, -1))
            del logits  # the next chunk must not hold these too
        result = nnsight.save(out)
    return result


def backpatch_logits(model, pairs: list[Pair], configs: list[Config], *, max_rows: int | None = None,
                     ids=None, progress: bool = False, allow_prefix_attention: bool = False,
                     vocab_max: bool = False) -> torch.Tensor:
    """(C, P, V) last-position logits (float32) of every pair under every back-patching config.

    ids: token ids to keep (e.g. the task's answer set): (C, P, len(ids)), so that remote runs send
    back a few logits instead of the vocabulary; vocab_max=True (with ids) appends the maximum logit over
    the whole vocabulary as a last column: (C, P, len(ids) + 1). Prompts and configs are split by the memory budget;
    configs are grouped by dst so that the layers below it are skipped. Remote: each request is one
    session whose first pass caches the residuals on the server. allow_prefix_attention: run on a model
    with prefix-LM attention, which is refused otherwise (`refusal`).
    """
    _refuse(model, allow_prefix_attention)
    check_layout(pairs)
    L = model.n_layers
    for src, dst, w in configs:
        if not (0 <= dst <= src and src + w <= L and w >= 1):
            raise ValueError(f"config (src={src}, dst={dst}, window={w}) needs 0 <= dst <= src and src + window <= {L}")
    if vocab_max and ids is None:
        raise ValueError("vocab_max=True needs ids (without them every logit comes back)")
    ids = None if ids is None else torch.as_tensor(ids, dtype=torch.long)
    order = sorted(range(len(configs)), key=lambda c: configs[c][1])  # by dst, stable
    # layers below dst are skipped (their cached output given) unless a later layer reads more of them than the
    # residual stream: the keys and values of KV-shared layers (Gemma 4's `num_kv_shared_layers`)
    shares_kv = getattr(model.text_config, "num_kv_shared_layers", 0)
    skip_below = () if model.adapter.layer_returns_tuple or shares_kv else tuple(sorted({d for _, d, _ in configs
                                                                                           if d > 0}))
    (start, end), d = pairs[0].spans["D"], model.text_config.hidden_size
    b = torch.finfo(model.dtype).bits // 8
    held = L * (end - start) * d * b + (1 + len(skip_below)) * pairs[0].length * d * b  # the cache, per prompt
    size = budget.rows(model, pairs[0].length, max_rows=max_rows, extra=held)
    out = []
    for part in requests.chunked(pairs, size):
        P = len(part)
        chunks = []
        for dst in sorted({configs[c][1] for c in order}):
            same = [configs[c] for c in order if configs[c][1] == dst]
            for chunk in requests.chunked(same, max(1, size // P)):
                writes = [[] for _ in range(L)]  # layer -> [(config index in chunk, src layer)]
                for j, (src, _, w) in enumerate(chunk):
                    for i in range(w):
                        writes[dst + i].append((j, src + i))
                chunks.append((len(chunk), writes, dst))
        inputs = model.prepare(batch([p.inputs for p in part]))
        out.append(torch.cat(requests.run(model, _backpatch_session, chunks, inputs, part[0].spans["D"], ids,
                                          model.adapter.vision_inputs, skip_below, desc="back-patching",
                                          progress=progress), 0))
    logits = finite(torch.cat(out, 1), "backpatch_logits", model)  # (C, P, V), configs in dst order
    logits = logits[torch.argsort(torch.tensor(order))]
    return logits[..., :-1] if ids is not None and not vocab_max else logits


def _correct_among(logits: torch.Tensor, pairs: list[Pair], answers: torch.Tensor, accuracy: str = "answer_set"
                   ) -> torch.Tensor:
    """(..., P) bool from logits (..., P, len(answers) + 1): the answer-set columns, then the vocabulary maximum.

    accuracy="answer_set": of the task's answers the right one scores highest; "top1": the right answer's logit
    is the vocabulary's maximum (the model's greedy next token, as `methods.predict.pairs_correct` counts it)."""
    right = torch.tensor([p.answer_id for p in pairs])
    if accuracy == "top1":
        column = (answers.view(-1, 1) == right.view(1, -1)).int().argmax(0)  # (P,) the right answer's column
        own = logits[..., :-1].gather(-1, column.view(-1, 1).expand(*logits.shape[:-1], 1))[..., 0]
        return own >= logits[..., -1]
    return answers[logits[..., :-1].argmax(-1)] == right


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
    base: CI  # test accuracy without patching (a fraction)
    patched: CI  # test accuracy with the chosen config (a fraction)
    gain: CI  # patched − base on the test split, in accuracy points (paired bootstrap)
    n_selection: int
    n_test: int
    accuracy: str = "answer_set"  # what the accuracies count (`ACCURACIES`)

    def __repr__(self) -> str:
        src, dst, window = self.config
        return (f"Backpatch(gain {self.gain.value:+.1f} points [{self.gain.low:+.1f}, {self.gain.high:+.1f}]: accuracy "
                f"{self.base.value:.3f} -> {self.patched.value:.3f} on {self.n_test} test prompts; src {src}, dst {dst}, "
                f"window {window} chosen on {self.n_selection} selection prompts)")


SELECTIONS = ("split", "reported")
ACCURACIES = ("answer_set", "top1")


def backpatch(model, pairs: list[Pair], *, configs: list[Config] | None = None, selection_fraction: float = 0.5,
              resamples: int = 1000, seed: int = 0, select_on: str = "split", progress: bool = True,
              allow_prefix_attention: bool = False, accuracy: str = "answer_set") -> Backpatch:
    """Choose (src, dst, window) on a selection split, report the accuracy gain on the disjoint test split.

    select_on="reported": choose on the very prompts whose accuracy is reported, as the reference code
    did (selection bias: docs/method.md section 11); both "splits" are then all distinct prompts.
    allow_prefix_attention: run on a model with prefix-LM attention, where the data positions see the question;
    refused otherwise, with the reason (`refusal`: the gain then does not mean what section 8 says).
    accuracy: "answer_set" (the study's: the right answer scores highest among the task's answers) or "top1"
    (the right answer is the greedy next token over the whole vocabulary, as the study step's accuracy counts)."""
    _refuse(model, allow_prefix_attention)
    if select_on not in SELECTIONS:
        raise ValueError(f"select_on must be one of {SELECTIONS}, got {select_on!r}")
    if accuracy not in ACCURACIES:
        raise ValueError(f"accuracy must be one of {ACCURACIES}, got {accuracy!r}")
    selection, test = split(pairs, selection_fraction)
    if select_on == "reported":
        selection = test = selection + test
    configs = configs or default_configs(model.n_layers)
    answers = answer_ids(model, pairs)
    # only the answer-set logits and the vocabulary maximum travel: all that either accuracy reads
    allow = {"allow_prefix_attention": allow_prefix_attention, "ids": answers, "vocab_max": True}
    base_sel = _correct_among(backpatch_logits(model, selection, [(0, 0, 1)], **allow)[0], selection, answers,
                              accuracy)
    base_sel = base_sel.float().mean()
    acc = _correct_among(backpatch_logits(model, selection, configs, progress=progress, **allow),
                         selection, answers, accuracy).float().mean(-1)
    best = int(acc.argmax())  # ties: the first in the grid
    both = backpatch_logits(model, test, [(0, 0, 1), configs[best]], **allow)
    ok = _correct_among(both, test, answers, accuracy).float()  # (2, P)
    n = len(test)
    return Backpatch(
        configs[best], {"base": float(base_sel), **{str(c): float(a) for c, a in zip(configs, acc)}},
        *(bootstrap_mean(x, resamples=resamples, seed=seed) for x in (ok[0], ok[1], 100 * (ok[1] - ok[0]))),
        len(selection), n, accuracy,
    )
