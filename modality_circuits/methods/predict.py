"""What the model answers: next-token predictions, per-prompt correctness, and the correctly answered pairs.

A prompt is answered correctly when the argmax of the next-token logits at its last position is
the answer's first token. This is the one accuracy of the package: the study's accuracy step, the
kept pairs, the toy's training validation and the experiments all read it.
"""
from __future__ import annotations

import nnsight
import torch

from ..data.pairs import Pair, answer_token, batch, chat_text, encode
from ..data.tasks import Prompt
from ..execution import budget, requests
from ..execution.checks import finite
from ..execution.remote import server_body


@server_body
def _logits_session(model, chunks: list) -> list:
    """One request: last-position logits (float32) of each chunk of inputs."""
    root, opts = model.nn, model.FORWARD
    with model.session():
        out = []
        for inputs in chunks:
            with root.trace(**inputs, **opts):
                logits = root.output.logits[:, -1].float()
            out.append(logits.cpu())
        result = nnsight.save(out)
    return result


def next_token_logits(model, inputs: list[dict], *, max_rows: int | None = None) -> torch.Tensor:
    """(N, V) float32 logits at the last position of each encoded prompt (processor outputs of batch 1, equal lengths)."""
    size = budget.rows(model, inputs[0]["input_ids"].shape[1], max_rows=max_rows)
    chunks = [model.prepare(batch(chunk)) for chunk in requests.chunked(inputs, size)]
    return finite(torch.cat(requests.run(model, _logits_session, chunks)), "next_token_logits", model)


def predictions(model, pairs: list[Pair], which: str = "prompt", *, max_rows: int | None = None) -> torch.Tensor:
    """(P, V) next-token logits at the last position of each pair's prompt (which="prompt") or counterfactual."""
    return next_token_logits(model, [p.inputs if which == "prompt" else p.cf_inputs for p in pairs], max_rows=max_rows)


def predicted(model, inputs: list[dict], *, max_rows: int | None = None) -> torch.Tensor:
    """(N,) top-1 next token of each encoded prompt; prompts of different lengths run in equal-length batches."""
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        by_length.setdefault(x["input_ids"].shape[1], []).append(i)
    out = torch.empty(len(inputs), dtype=torch.long)
    for idx in by_length.values():
        out[idx] = next_token_logits(model, [inputs[i] for i in idx], max_rows=max_rows).argmax(-1)
    return out


def correct(model, prompts: list[Prompt], *, max_rows: int | None = None) -> list[bool]:
    """Whether the model answers each prompt: top-1 next token == the answer's first token."""
    texts = [chat_text(model, p) for p in prompts]
    ids = torch.tensor([answer_token(model, t, p) for t, p in zip(texts, prompts)])
    inputs = [encode(model, [t], [p.image] if p.image is not None else None) for t, p in zip(texts, prompts)]
    return (predicted(model, inputs, max_rows=max_rows) == ids).tolist()


def pairs_correct(model, pairs: list[Pair], which: str = "prompt") -> torch.Tensor:
    """(P,) bool: the model answers the pair's prompt (or counterfactual, which="cf") correctly."""
    ids = torch.tensor([p.answer_id if which == "prompt" else p.cf_answer_id for p in pairs])
    return predicted(model, [p.inputs if which == "prompt" else p.cf_inputs for p in pairs]) == ids


def keep_correct(model, pairs: list[Pair]) -> list[Pair]:
    """The pairs whose prompt and counterfactual the model both answers correctly (top-1 token)."""
    ok = pairs_correct(model, pairs) & pairs_correct(model, pairs, "cf")
    return [p for p, keep in zip(pairs, ok.tolist()) if keep]
