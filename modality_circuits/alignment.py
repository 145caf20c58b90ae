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

from .pairs import Pair, batch, check_aligned
from .stats import CI, bootstrap


def residuals(model, pairs: list[Pair], span: str = "D") -> torch.Tensor:
    """(P, L, n, d) decoder-layer outputs at the positions of `span` of each pair's prompt."""
    check_aligned(pairs)
    start, end = pairs[0].spans[span]
    with model.trace(batch([p.inputs for p in pairs])):
        out = nnsight.save([])
        for layer in model.layers():
            h = layer.output
            h = h[0] if isinstance(h, tuple) else h
            out.append(h[:, start:end].detach().float().cpu())
    return torch.stack(out, 1)


def match(image_pairs: list[Pair], text_pairs: list[Pair]) -> list[tuple[int, int]]:
    """Index pairs (image, text) whose prompts were generated from the same content (same meta)."""
    key = {json.dumps(p.prompt.meta, sort_keys=True, default=str): i for i, p in enumerate(text_pairs)}
    found = [(i, key.get(json.dumps(p.prompt.meta, sort_keys=True, default=str))) for i, p in enumerate(image_pairs)]
    return [(i, j) for i, j in found if j is not None]


@dataclass
class Alignment:
    per_layer: torch.Tensor  # (L,) mean over image tokens and prompts of the max cosine similarity
    per_prompt: torch.Tensor  # (P, L)
    ci: list[CI]  # per layer, bootstrap over prompts


def alignment(model, image_pairs: list[Pair], text_pairs: list[Pair], *, resamples: int = 1000) -> Alignment:
    """Per layer, how text-like the image tokens are; prompts are matched by their content."""
    idx = match(image_pairs, text_pairs)
    if not idx:
        raise ValueError("no image prompt has a textual prompt with the same content; build both with the same seed")
    img = residuals(model, [image_pairs[i] for i, _ in idx])  # (P, L, n_img, d)
    txt = residuals(model, [text_pairs[j] for _, j in idx])  # (P, L, n_txt, d)
    cos = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).transpose(-1, -2)
    per_prompt = cos.max(-1).values.mean(-1)  # (P, L)
    cis = [bootstrap(lambda i, l=l: float(per_prompt[i, l].mean()), len(per_prompt), resamples=resamples)
           for l in range(per_prompt.shape[1])]
    return Alignment(per_prompt.mean(0), per_prompt, cis)
