"""Image-to-text alignment across layers (METHOD.md section 7).

For each layer and each image token of a visual prompt: the maximum cosine similarity of its
residual stream to any data-token residual of the aligned textual prompt (separate forward
pass, same layer); averaged over image tokens and prompts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import nnsight
import torch

from ..circuits.stats import CI, bootstrap
from ..data.pairs import Pair, batch, check_layout
from ..execution.remote import server_body


@server_body
def _alignment_session(model, image_inputs: dict, image_span: tuple, text_inputs: dict, text_span: tuple) -> torch.Tensor:
    """One request: both forward passes and the similarities; only the (P, L) per-prompt means come back."""
    root, layers = model.nn, model.layers()
    tuple_out = model.adapter.layer_returns_tuple
    with model.session():
        res = []
        for inputs, (start, end) in ((image_inputs, image_span), (text_inputs, text_span)):
            with root.trace(**inputs):
                hs = []
                for layer in layers:
                    h = layer.output[0] if tuple_out else layer.output
                    hs.append(h[:, start:end].detach().float())
            res.append(torch.stack(hs, 1))  # (P, L, n, d), stays where the model runs
        img = torch.nn.functional.normalize(res[0], dim=-1)
        txt = torch.nn.functional.normalize(res[1], dim=-1)
        per_prompt = nnsight.save((img @ txt.transpose(-1, -2)).max(-1).values.mean(-1).cpu())  # (P, L)
    return per_prompt


def match(image_pairs: list[Pair], text_pairs: list[Pair]) -> list[tuple[int, int]]:
    """Index pairs (image, text) whose prompts were generated from the same content (same meta)."""
    key = {json.dumps(p.prompt.meta, sort_keys=True, default=str): i for i, p in enumerate(text_pairs)}
    found = [(i, key.get(json.dumps(p.prompt.meta, sort_keys=True, default=str))) for i, p in enumerate(image_pairs)]
    return [(i, j) for i, j in found if j is not None]


@dataclass
class Alignment:
    """Image-to-text alignment per layer, with the per-prompt values and their bootstrap intervals."""

    per_layer: torch.Tensor  # (L,) mean over image tokens and prompts of the max cosine similarity
    per_prompt: torch.Tensor  # (P, L)
    ci: list[CI]  # per layer, bootstrap over prompts


def alignment(model, image_pairs: list[Pair], text_pairs: list[Pair], *, resamples: int = 1000) -> Alignment:
    """Per layer, how text-like the image tokens are; prompts are matched by their content."""
    idx = match(image_pairs, text_pairs)
    if not idx:
        raise ValueError("no image prompt has a textual prompt with the same content; build both with the same seed")
    images, texts = [image_pairs[i] for i, _ in idx], [text_pairs[j] for _, j in idx]
    check_layout(images)
    check_layout(texts)
    per_prompt = model.call(_alignment_session, model.prepare(batch([p.inputs for p in images])), images[0].spans["D"],
                            model.prepare(batch([p.inputs for p in texts])), texts[0].spans["D"])  # (P, L)
    cis = [bootstrap(lambda i, l=l: float(per_prompt[i, l].mean()), len(per_prompt), resamples=resamples)
           for l in range(per_prompt.shape[1])]
    return Alignment(per_prompt.mean(0), per_prompt, cis)
