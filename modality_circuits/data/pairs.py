"""Aligned (prompt, counterfactual) pairs for a model: chat template, tokens, answer ids and D/Q/G spans.

A prompt is the model's chat template around data part, query part and the
generation prompt. Spans are found from the tokenised text (character offsets and
image-token ids), never from hard-coded indices.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import torch

from .tasks import MODALITIES, Prompt, Task, get_task, sample_pairs

#: The three spans of a prompt: data (words or image tokens), query, generation prompt (template tail).
SPANS = ("D", "Q", "G")


class LayoutError(ValueError):
    """A prompt and its counterfactual (or two pairs) differ in token layout: length or span positions."""


@dataclass
class Pair:
    """A prompt p and its counterfactual p' with the same token layout.

    inputs / cf_inputs: processor outputs (batch of 1) for p and p'.
    spans: {"D"|"Q"|"G": (start, end)} token positions, end exclusive, shared by p and p'.
    tokens: (T,) p's tokens, image tokens named by their patch (`token_labels`).
    grid: (rows, cols, {position: (row, col)}) of p's image patches (`patch_grid`); (0, 0, {}) for text.
    """

    prompt: Prompt
    cf: Prompt
    inputs: dict
    cf_inputs: dict
    answer_id: int
    cf_answer_id: int
    spans: dict[str, tuple[int, int]]
    tokens: list[str] = field(default_factory=list)
    grid: tuple[int, int, dict[int, tuple[int, int]]] = field(default_factory=lambda: (0, 0, {}))

    @property
    def length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def __repr__(self) -> str:
        spans = " ".join(f"{s} {a}:{b}" for s, (a, b) in self.spans.items())
        grid = f", {self.grid[0]}x{self.grid[1]} patches" if self.grid[0] else ""
        return (f"Pair({self.prompt.task}/{self.prompt.modality}, {self.length} tokens, {spans}{grid}, "
                f"answer {self.prompt.answer!r} vs {self.cf.answer!r})")


def chat_text(model, prompt: Prompt) -> str:
    """The prompt in the model's chat template, ending with the generation prompt and the family's `answer_prefix`.

    A checkpoint without a chat template is prompted in its family's `Adapter.prompt_format`."""
    body = prompt.query if prompt.modality == "image" else f"{prompt.data}\n{prompt.query}"
    fmt = model.adapter.prompt_format
    if fmt is not None and not (getattr(model.processor, "chat_template", None) or model.tokenizer.chat_template):
        image = model.adapter.image_placeholder if prompt.modality == "image" else ""
        return fmt.format(image=image, text=body) + model.adapter.answer_prefix
    content = ([{"type": "image"}] if prompt.modality == "image" else []) + [{"type": "text", "text": body}]
    messages = [{"role": "user", "content": content}]
    text = model.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + model.adapter.answer_prefix


def encode(model, texts: list[str], images: list | None = None) -> dict:
    """Forward inputs for a batch of chat texts (one image per text, or none): the processor's outputs.

    What the processor writes into an image prompt itself (`Adapter.processor_adds`) is left out of the text it
    is handed. Training targets (`labels`, which some processors return) are dropped: they are no forward input.
    With prefix-LM attention (`Adapter.attention` "prefix") a text prompt carries token_type_ids of zeros, as
    the processor gives an image prompt: the whole prompt is the prefix, attended both ways."""
    adapter = model.adapter
    if images:
        texts = [_without_processor_adds(adapter, t) for t in texts]
        out = dict(model.processor(text=texts, images=[[im] for im in images], return_tensors="pt", add_special_tokens=False))
    else:
        out = dict(model.tokenizer(texts, return_tensors="pt", add_special_tokens=False))
        if adapter.attention == "prefix":
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    out.pop("labels", None)
    return out


def _without_processor_adds(adapter, text: str) -> str:
    """`text` without what the processor writes itself: after the last image placeholder, and at the end."""
    after_image, at_end = adapter.processor_adds
    if after_image:
        cut = text.rindex(adapter.image_placeholder) + len(adapter.image_placeholder)
        if not text.startswith(after_image, cut):
            raise ValueError(f"the prompt must have {after_image!r} after its last image placeholder: {text!r}")
        text = text[:cut] + text[cut + len(after_image):]
    if at_end:
        if not text.endswith(at_end):
            raise ValueError(f"the prompt must end in {at_end!r}: {text!r}")
        text = text[:-len(at_end)]
    return text


def batch(inputs: list[dict]) -> dict:
    """Concatenate processor outputs of equal-length prompts along the batch (or patch) dimension."""
    return {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}


def _token_span(offsets, start: int, end: int) -> tuple[int, int]:
    idx = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return idx[0], idx[-1] + 1


def find_spans(model, prompt: Prompt, text: str, input_ids: torch.Tensor) -> dict[str, tuple[int, int]]:
    """D/Q/G token spans of one encoded prompt (input_ids: (seq,))."""
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    q_char = text.rindex(prompt.query)
    q0, q1 = _token_span(offsets, q_char, q_char + len(prompt.query))
    n, shift = len(ids), input_ids.shape[0] - len(ids)  # image prompts: the placeholder was expanded before Q
    if input_ids[q0 + shift:].tolist() != ids[q0:]:
        raise LayoutError("could not locate the query tokens in the processor's encoding")
    spans = {"Q": (q0 + shift, q1 + shift), "G": (q1 + shift, n + shift)}
    if prompt.modality == "image":
        pos = model.image_mask(input_ids).nonzero().flatten()
        inside = input_ids[pos[0]:pos[-1] + 1] if len(pos) else input_ids[:0]
        if len(pos) == 0 or not torch.isin(inside, torch.tensor(model.image_token_ids + model.image_text_ids)).all():
            raise LayoutError(f"image tokens are missing or not contiguous ({len(pos)} found)")
        spans["D"] = (int(pos[0]), int(pos[-1]) + 1)
    else:
        d_char = text.rindex(prompt.data, 0, q_char)
        spans["D"] = _token_span(offsets, d_char, d_char + len(prompt.data))
    return {s: spans[s] for s in SPANS}


def patch_grid(model, pair: Pair) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(rows, cols, {position: (row, col)}) of the image-patch tokens of p's D span, row-major.

    How the tokens tile the image is the family's `Adapter.patch_grid`; row-break and end markers
    get no patch. "base_rows" (anyres) gives the base image's grid; its high-res crop tokens and
    their row-closing newlines get no patch here (`anyres_rows`). A text prompt has no grid: (0, 0, {}).
    """
    if pair.prompt.modality != "image":
        return 0, 0, {}
    start, end = pair.spans["D"]
    ids = pair.inputs["input_ids"][0, start:end].tolist()
    patches = _image_positions(model, pair)
    n, layout = len(patches), model.adapter.patch_grid
    if layout == "base_rows":  # the base image's tokens come first: the vision tower's square patch grid
        side = _tower_side(model)
        if n <= side * side:
            raise LayoutError(f"{n} image tokens do not hold a {side}x{side} base image and high-res rows")
        anyres_rows(model, pair)  # refuses a remainder that is no set of rows closed by a newline
        patches, rows, cols, n = patches[: side * side], side, side, side * side
    elif layout == "frames":  # equal runs of tokens, the tiles then the global view: the global view's grid
        patches = _runs(patches)[-1]
        n = len(patches)
        rows = cols = math.isqrt(n)
    elif layout == "rows":  # a marker closes every row: a row break, or the end marker after the last one
        rows = len(ids) - n
        cols = n // max(rows, 1)
    elif layout == "thw":  # (h / merge) x (w / merge) tokens, so rows = sqrt(n h / w)
        _, h, w = pair.inputs["image_grid_thw"][0].tolist()
        rows = round(math.sqrt(n * h / w))
        cols = n // max(rows, 1)
    else:
        rows = cols = math.isqrt(n)
    if rows * cols != n or n == 0:
        raise LayoutError(f"{n} image tokens do not tile a {layout!r} patch grid of {rows} rows")
    return rows, cols, {pos: divmod(i, cols) for i, pos in enumerate(patches)}


def _image_positions(model, pair: Pair) -> list[int]:
    """Positions of p's D span holding the image token (patches; not the markers around them)."""
    start, end = pair.spans["D"]
    ids = pair.inputs["input_ids"][0, start:end].tolist()
    return [start + i for i, t in enumerate(ids) if t == model.image_token_ids[0]]


def _runs(positions: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive positions."""
    runs = []
    for pos in positions:
        if runs and pos == runs[-1][-1] + 1:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    return runs


def _tower_side(model) -> int:
    """Patches along a side of the vision tower's square input (an anyres base image or crop)."""
    vc = model.hf_model.config.vision_config
    return vc.image_size // vc.patch_size


def anyres_rows(model, pair: Pair) -> tuple[int, int, dict[int, tuple[int, int] | None]]:
    """(rows, cols, {position: (row, col), or None for a row's closing newline}) of the high-res tokens of an
    anyres ("base_rows") image: after the base image's side^2 tokens, rows of cols patches each closed by a
    newline. The row count is the one whose grid is closest to the image's aspect ratio (`image_sizes`)."""
    start, end = pair.spans["D"]
    side = _tower_side(model)
    first, m = start + side * side, end - start - side * side
    h, w = pair.inputs["image_sizes"][0].tolist() if "image_sizes" in pair.inputs else (1, 1)
    shapes = [(r, m // r - 1) for r in range(1, m + 1) if m % r == 0 and m // r > 1]
    if not shapes:
        raise LayoutError(f"{m} high-res image tokens do not form rows closed by a newline")
    rows, cols = min(shapes, key=lambda rc: abs(math.log(rc[1] * h / (rc[0] * w))))
    where = {first + i: (divmod(i, cols + 1) if i % (cols + 1) < cols else None) for i in range(m)}
    return rows, cols, where


def patch_regions(model, pair: Pair) -> dict[int, tuple[float, float, float, float]]:
    """{position: (top, left, bottom, right)} of the image region each patch token of p's D span sees, as fractions
    of the image side: `grid`'s patches, and in tiled layouts also the tiles' ("frames") or the high-res crop's
    ("base_rows") tokens, so a region can be seen by several tokens (a tile and the global view). Text: {}."""
    rows, cols, where = pair.grid

    def cell(r, c, n_rows, n_cols):
        return r / n_rows, c / n_cols, (r + 1) / n_rows, (c + 1) / n_cols
    out = {pos: cell(r, c, rows, cols) for pos, (r, c) in where.items()}
    if model.adapter.patch_grid == "base_rows":
        high_rows, high_cols, high = anyres_rows(model, pair)
        out.update({pos: cell(*rc, high_rows, high_cols) for pos, rc in high.items() if rc})
    elif model.adapter.patch_grid == "frames":  # square tiles, row-major, each with the global view's grid
        tiles = _runs(_image_positions(model, pair))[:-1]
        side = math.isqrt(len(tiles))
        if side * side != len(tiles):
            raise LayoutError(f"{len(tiles)} tiles do not form a square grid of tiles")
        for k, run in enumerate(tiles):
            tile_row, tile_col = divmod(k, side)
            for i, pos in enumerate(run):
                r, c = divmod(i, cols)
                out[pos] = cell(tile_row * rows + r, tile_col * cols + c, side * rows, side * cols)
    return out


def token_labels(model, pair: Pair) -> list[str]:
    """(T,) p's tokens as the tokenizer decodes them (newlines as \\n); image patches as "<img r2c3>" (row 2,
    column 3), markers before them as "<img start>", those closing image rows as "<img break>" and the last one
    as "<img end>". Tiled ("frames") images: the global view's patches as "<img r2c3>", tile k's as
    "<img tk r2c3>", the tile names and separators as decoded. Anyres
    ("base_rows") images: the base image's patches as "<img r2c3>", the high-res ones as "<img hi r2c3>",
    the newline closing each high-res row as "<img break>"."""
    labels = [model.tokenizer.decode([i]).replace("\n", "\\n") for i in pair.inputs["input_ids"][0].tolist()]
    if pair.prompt.modality == "image":
        start, end = pair.spans["D"]
        where = pair.grid[2]
        if model.adapter.patch_grid == "base_rows":
            high = anyres_rows(model, pair)[2]
            for pos in range(start, end):
                labels[pos] = ("<img r{}c{}>".format(*where[pos]) if pos in where
                               else "<img hi r{}c{}>".format(*high[pos]) if high[pos] else "<img break>")
            return labels
        if model.adapter.patch_grid == "frames":  # tiles' patches as "<img t0 r1c2>"; their markers as decoded
            side = math.isqrt(len(where))
            for k, run in enumerate(_runs(_image_positions(model, pair))[:-1]):
                for i, pos in enumerate(run):
                    labels[pos] = "<img t{} r{}c{}>".format(k, *divmod(i, side))
            for pos in where:
                labels[pos] = "<img r{}c{}>".format(*where[pos])
            return labels
        first = min(where)
        for pos in range(start, end):
            labels[pos] = ("<img r{}c{}>".format(*where[pos]) if pos in where else "<img start>" if pos < first
                           else "<img end>" if pos == end - 1 else "<img break>")
    return labels


def check_known(model, text: str) -> None:
    """Refuse text with words the tokenizer does not know (a word-level tokenizer reads them as its unknown token)."""
    tok = model.tokenizer
    if tok.unk_token_id is None:
        return
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    unknown = sorted({text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == tok.unk_token_id})
    if unknown:
        raise ValueError(f"{model.name}'s tokenizer does not know {', '.join(map(repr, unknown))} (it would read "
                         f"{tok.unk_token!r}): use words of its vocabulary in the prompts and answers")


def _ends_in_special(tok, ids: list[int]) -> bool:
    """Whether the encoded prompt ends in a special token (an "[/INST]" or a turn marker)."""
    added = getattr(tok, "added_tokens_decoder", {})
    return bool(ids) and ids[-1] in added and added[ids[-1]].special


def answer_token(model, text: str, prompt: Prompt) -> int:
    """Id of the answer's first token as generated after `text`; multi-word answers and unknown words are refused.

    After a generation prompt that ends in a word or punctuation (e.g. "ASSISTANT:") a model writes the
    answer after a space, so its first token is the space-prefixed variant (" 4", "▁4"); after a newline
    (e.g. "<|im_start|>assistant\n") or a special token (e.g. "[/INST]": the Tekken tokenizer's own chat
    encoding puts an assistant reply as the bare word right after it) it is the bare word. A one-word answer
    that a subword tokenizer splits (Tekken: "purple" -> "pur" "ple", "happy" -> "h" "appy", "12" -> "1" "2") is
    scored at its first token, r of docs/method.md; an answer of several words needs the task's `first_token`."""
    tok = model.tokenizer
    base = tok(text, add_special_tokens=False)["input_ids"]
    bare = not text or text[-1].isspace() or _ends_in_special(tok, base)
    answer = prompt.answer if bare else " " + prompt.answer
    full = tok(text + answer, add_special_tokens=False)["input_ids"]
    new = full[len(base):]
    if full[: len(base)] != base or not new:
        raise ValueError(f"answer {prompt.answer!r} merges with the prompt's last token")
    if len(new) > 1 and len(prompt.answer.split()) > 1 and not get_task(prompt.task).first_token:
        raise ValueError(f"answer {prompt.answer!r} is {len(new)} tokens of several words; the metric needs "
                         "single-token (or one-word) answers")
    check_known(model, text + answer)
    return new[0]


POSITIONS = ("model", "1d")


def check_image_size(model, size: tuple[int, int]) -> None:
    """Refuse an image of another size than the model's for a family whose processor tiles (`Adapter.tiles`):
    its token layout depends on the size, so pairs align only at one fixed size."""
    fixed = (model.image_size, model.image_size)
    if model.adapter.tiles and tuple(size) != fixed:
        raise LayoutError(f"image size {tuple(size)} is not {fixed}: {model.adapter.family} tiles images, so its "
                          f"token layout changes with the size and pairs align only at its fixed "
                          f"{model.image_size}x{model.image_size} images")


def make_pair(model, prompt: Prompt, cf: Prompt, *, positions: str = "model") -> Pair:
    """Encode p and p' and check they align: same length, same spans, same image size, different answers."""
    if (prompt.task, prompt.modality) != (cf.task, cf.modality):
        raise LayoutError(f"pair mixes {prompt.task}/{prompt.modality} with {cf.task}/{cf.modality}")
    if prompt.modality == "image" and prompt.image.size != cf.image.size:
        raise LayoutError(f"image sizes differ: {prompt.image.size} vs {cf.image.size}")
    if prompt.modality == "image":
        check_image_size(model, prompt.image.size)
    texts = [chat_text(model, p) for p in (prompt, cf)]
    ids = [answer_token(model, t, p) for t, p in zip(texts, (prompt, cf))]  # first: refuses unknown words
    enc = [encode(model, [t], [p.image] if p.image is not None else None) for t, p in zip(texts, (prompt, cf))]
    if positions == "1d":  # the reference's Qwen2-VL port: plain 1-D rotary positions, image tokens included
        for e in enc:
            e["position_ids"] = torch.arange(e["input_ids"].shape[1])[None]
    if enc[0]["input_ids"].shape != enc[1]["input_ids"].shape:
        raise LayoutError(
            f"counterfactual has {enc[1]['input_ids'].shape[1]} tokens, prompt {enc[0]['input_ids'].shape[1]}: "
            f"{prompt.data or prompt.query!r} vs {cf.data or cf.query!r}"
        )
    spans = [find_spans(model, p, t, e["input_ids"][0]) for p, t, e in zip((prompt, cf), texts, enc)]
    if spans[0] != spans[1]:
        raise LayoutError(f"span layouts differ: {spans[0]} vs {spans[1]}")
    if ids[0] == ids[1]:
        raise LayoutError(f"answers {prompt.answer!r} and {cf.answer!r} share their first token")
    pair = Pair(prompt, cf, enc[0], enc[1], ids[0], ids[1], spans[0])
    pair.grid = patch_grid(model, pair)
    pair.tokens = token_labels(model, pair)
    return pair


def check_layout(pairs: list[Pair]) -> None:
    """All pairs must share length and span layout (circuits are per position)."""
    if not pairs:
        raise ValueError("no pairs given")
    ref = pairs[0]
    for i, p in enumerate(pairs):
        if p.length != ref.length or p.spans != ref.spans:
            raise LayoutError(f"pair {i} has length {p.length} and spans {p.spans}; pair 0 has {ref.length}, {ref.spans}")


def build_pairs(task: "str | Task", modality: str, model, *, n: int = 32, seed: int = 0, data_dir=None, image_size=None,
                wording: str | None = None, positions: str = "model", counterfactuals: str = "random") -> list[Pair]:
    """n aligned pairs of one task (a name or a `Task`) and modality for `model`, all with the same token layout and
    distinct prompts. wording: "study" or "toy" (default: the model's, `VLM.wording`). positions: "model" (the
    model's own, M-RoPE included) or "1d" (plain 1-D positions, as the reference code's Qwen2-VL port had them).
    counterfactuals: "random" (the study's) or "minimal" (`sample_pairs`).

    Candidates whose counterfactual cannot be aligned, or whose prompt repeats an earlier pair's, are
    skipped; of the rest, the most common layout (length and spans) is kept. A warning counts what was
    skipped, and says how many pairs there are when fewer than n; none is an error.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    task = get_task(task)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
    size = image_size or model.image_size
    if modality == "image":
        check_image_size(model, (size, size))
    candidates = sample_pairs(task, modality, 5 * n, seed=seed, image_size=size, data_dir=data_dir,
                              wording=wording or model.wording, counterfactuals=counterfactuals)
    layouts, rejected, seen = {}, [], set()
    for p, cf in candidates:
        if prompt_key(p) in seen:  # a repeated prompt adds no information
            continue
        try:
            pair = make_pair(model, p, cf, positions=positions)
        except LayoutError as err:
            rejected.append(str(err))
            continue
        seen.add(prompt_key(p))
        group = layouts.setdefault((pair.length, tuple(sorted(pair.spans.items()))), [])
        group.append(pair)
        if len(group) == n:
            break
    pairs = max(layouts.values(), key=len, default=[])
    skipped = len(rejected) + sum(len(g) for g in layouts.values()) - len(pairs)
    if skipped:
        example = rejected[0] if rejected else "a different token layout"
        warnings.warn(f"{task.name}/{modality}: skipped {skipped} candidate pairs that do not align, e.g. {example}")
    if not pairs:
        raise LayoutError(f"{task.name}/{modality}: no candidate pair aligns for {model.name}")
    if len(pairs) < n:
        warnings.warn(f"{task.name}/{modality}: only {len(pairs)} distinct pairs of one token layout for {model.name} "
                      f"(asked for {n}); using those")
    return pairs


def prompt_key(prompt: Prompt) -> str:
    """Identity of a prompt's content (same key = same prompt)."""
    return json.dumps([prompt.task, prompt.modality, prompt.query, prompt.meta], sort_keys=True, default=str)


def split(pairs: list[Pair], fraction: float = 0.75) -> tuple[list[Pair], list[Pair]]:
    """Deterministic disjoint split: the first `fraction` of the distinct prompts, and the rest.

    Repeated prompts are dropped first, so the two parts never share a prompt.
    """
    seen, unique = set(), []
    for p in pairs:
        if prompt_key(p.prompt) not in seen:
            seen.add(prompt_key(p.prompt))
            unique.append(p)
    pairs = unique
    cut = int(round(fraction * len(pairs)))
    if not 0 < cut < len(pairs):
        raise ValueError(f"cannot split {len(pairs)} pairs {fraction:.0%}/{1 - fraction:.0%}: need more pairs")
    return pairs[:cut], pairs[cut:]
