"""Image-to-text alignment across layers (docs/method.md section 7).

For each layer and each image token of a visual prompt: the maximum cosine similarity of its
residual stream to any data-token residual of the aligned textual prompt (separate forward
pass, same layer); averaged over image tokens and prompts. Options give the study's choices: the
maximum over every token of the textual prompt (text_tokens="all") and the image tokens alone,
without the markers a family puts in D (image_tokens="image").
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import nnsight
import torch

from ..circuits.stats import CI, bootstrap_mean
from ..data.pairs import Pair, batch, check_layout
from ..execution import budget, requests
from ..execution.checks import finite
from ..execution.remote import server_body


@server_body
def _alignment_session(model, chunks: list, image_pos: torch.Tensor, text_pos: torch.Tensor) -> list:
    """One request: for each chunk (image inputs, text inputs of the same P prompts), both forward
    passes and the similarities at the positions image_pos (n,) and text_pos (m,); only the (P, L)
    per-prompt means come back. Layer i's residual is what layer i + 1 reads (visual features injected
    after layer i included, docs/method.md section 13)."""
    root, layers, opts = model.nn, model.layers(), model.FORWARD
    tuple_out = model.adapter.layer_returns_tuple
    stack, inject, keys = model.decoder_stack(), model.injects(chunks[0][0]), model.adapter.injections
    with model.session():
        out = []
        for image_inputs, text_inputs in chunks:
            res = []
            for inputs, pos in ((image_inputs, image_pos), (text_inputs, text_pos)):
                with root.trace(**inputs, **opts):
                    n = len(stack.inputs[1][keys[0]]) if inject and inputs is image_inputs else 0
                    hs = []
                    for i, layer in enumerate(layers):  # the stream layer i + 1 reads: injected features included
                        h = layers[i + 1].input if i < n else layer.output[0] if tuple_out else layer.output
                        hs.append(h[:, pos.to(h.device)].detach().float().to(hs[0].device if hs else h.device))
                        # (device_map: gathered on the first layer's device)
                res.append(torch.stack(hs, 1))  # (P, L, n, d), stays where the model runs
            img = torch.nn.functional.normalize(res[0], dim=-1)
            txt = torch.nn.functional.normalize(res[1], dim=-1)
            out.append((img @ txt.transpose(-1, -2)).max(-1).values.mean(-1).cpu())  # (P, L)
            del res, img, txt, hs, h  # the next chunk must not hold these too
        result = nnsight.save(out)
    return result


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

    def __repr__(self) -> str:
        values = self.per_layer.tolist()
        shown = " ".join(f"{v:.2f}" for v in values) if len(values) <= 12 else (
            " ".join(f"{v:.2f}" for v in values[:5]) + " ... " + " ".join(f"{v:.2f}" for v in values[-5:]))
        return (f"Alignment({len(values)} layers (0-based), {len(self.per_prompt)} prompts; max cosine per layer: "
                f"{shown})")


TEXT_TOKENS = ("data", "all")
IMAGE_TOKENS = ("span", "image")


def alignment(model, image_pairs: list[Pair], text_pairs: list[Pair], *, resamples: int = 1000,
              max_rows: int | None = None, progress: bool = True, text_tokens: str = "data",
              image_tokens: str = "span") -> Alignment:
    """Per layer, how text-like the image tokens are; prompts are matched by their content.

    text_tokens: "data" (ours: the maximum over the textual prompt's data tokens D) or "all" (the study's: over
    every token of the textual prompt). image_tokens: "span" (ours: every position of the visual D, markers such
    as Pixtral's [IMG_BREAK]/[IMG_END] included) or "image" (the study's: the image tokens alone)."""
    if text_tokens not in TEXT_TOKENS or image_tokens not in IMAGE_TOKENS:
        raise ValueError(f"text_tokens must be one of {TEXT_TOKENS} and image_tokens one of {IMAGE_TOKENS}; "
                         f"got {text_tokens!r}, {image_tokens!r}")
    for name, pairs, modality in (("image_pairs", image_pairs, "image"), ("text_pairs", text_pairs, "text")):
        found = sorted({p.prompt.modality for p in pairs})
        if found != [modality]:
            raise ValueError(f"alignment(model, image_pairs, text_pairs): {name} must be {modality} prompts, "
                             f"got {' and '.join(found) or 'none'}")
    idx = match(image_pairs, text_pairs)
    if not idx:
        raise ValueError("no image prompt has a textual prompt with the same content; build both with the same seed")
    images, texts = [image_pairs[i] for i, _ in idx], [text_pairs[j] for _, j in idx]
    check_layout(images)
    check_layout(texts)
    (i0, i1), (t0, t1) = images[0].spans["D"], texts[0].spans["D"]
    image_pos = torch.arange(i0, i1)
    if image_tokens == "image":
        image_pos = image_pos[images[0].inputs["input_ids"][0, i0:i1].cpu() == model.image_token_ids[0]]  # no markers
    text_pos = torch.arange(t0, t1) if text_tokens == "data" else torch.arange(texts[0].length)
    # a row holds its forward and the fp32 residuals of the compared positions at every layer
    cache = 4 * model.n_layers * model.text_config.hidden_size * max(len(image_pos), len(text_pos))
    size = budget.rows(model, max(images[0].length, texts[0].length), max_rows=max_rows, extra=cache)
    work = [(model.prepare(batch([i.inputs for i, _ in part])), model.prepare(batch([t.inputs for _, t in part])))
            for part in requests.chunked(list(zip(images, texts)), size)]
    per_prompt = finite(torch.cat(requests.run(model, _alignment_session, work, image_pos, text_pos, desc="alignment",
                                               progress=progress)), "alignment", model)  # (P, L)
    cis = [bootstrap_mean(per_prompt[:, l], resamples=resamples) for l in range(per_prompt.shape[1])]
    return Alignment(per_prompt.mean(0), per_prompt, cis)
