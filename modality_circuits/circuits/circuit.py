"""Node scores and the Circuit object every step reads and writes.

A node is (layer, unit, position); units are attention heads (o_proj input split
into heads) and MLP neurons (down_proj input). Masks and scores share one layout:
heads (layers, n_heads, positions) and neurons (layers, d_mlp, positions).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..execution.checkpoint import fingerprint
from ..execution.checks import finite
from ..execution.store import atomic
from .metrics import count

FORMAT_VERSION = 1


@dataclass
class Scores:
    """Mean signed node scores over pairs: heads (L, H, T), neurons (L, I, T).

    per_pair: every pair's scores ((P, L, H, T), (P, L, I, T)), or with `kept` = (head index,
    neuron index) only those at the flat indices `kept` of the layouts ((P, n_heads_kept),
    (P, n_neurons_kept)); square_sums: Σ over pairs of score², in the layouts of heads and neurons.
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    spans: dict[str, tuple[int, int]]
    model: str
    n_pairs: int
    meta: dict = field(default_factory=dict)
    per_pair: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    kept: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    square_sums: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    task: str | None = None  # the task and modality of the pairs they were computed on (None: not recorded)
    modality: str | None = None

    def resample(self, idx) -> "Scores":
        """Scores averaged over the pairs `idx` (with repeats) of per_pair: one bootstrap draw.

        With `kept` indices, nodes outside them score 0 (circuits/candidates.py certifies that no
        resampled circuit would have picked them)."""
        h, n = (v[0] for v in self.resampled(torch.as_tensor(idx)[None]))
        return Scores(h, n, self.spans, self.model, len(idx), self.meta, task=self.task, modality=self.modality)

    def resampled(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(heads (B, L, H, T), neurons (B, L, I, T)): the mean scores over the pairs of each row of the (B, P')
        index matrix idx (one bootstrap draw a row)."""
        if self.per_pair is None:
            raise ValueError("these scores kept no per-pair values: attribute(..., per_pair=True)")
        idx = torch.as_tensor(idx)
        dtype = self.per_pair[0].dtype
        w = torch.zeros(len(idx), self.per_pair[0].shape[0], dtype=dtype).scatter_add_(1, idx, torch.ones(idx.shape, dtype=dtype))
        w = w / idx.shape[1]  # the mean over a draw as one product with the draw's counts (no copy of the rows)
        h, n = (w @ v.flatten(1) for v in self.per_pair)
        if self.kept is not None:
            h, n = (torch.zeros(len(idx), like.numel(), dtype=v.dtype).index_copy_(1, i, v)
                    for v, i, like in zip((h, n), self.kept, (self.heads, self.neurons)))
        return h.view(len(idx), *self.heads.shape), n.view(len(idx), *self.neurons.shape)

    def per_position(self, absolute: bool = False) -> torch.Tensor:
        """(T,) summed signed score of every node at each position (the attributed position effect);
        absolute=True sums |score| per node instead (the study's per-position view: per-component effects)."""
        heads, neurons = (self.heads.abs(), self.neurons.abs()) if absolute else (self.heads, self.neurons)
        return heads.sum((0, 1)) + neurons.sum((0, 1))

    def __repr__(self) -> str:
        return (f"Scores({_origin(self)}, {self.n_pairs} pairs, heads {tuple(self.heads.shape)}, neurons "
                f"{tuple(self.neurons.shape)}, {_span_text(self.spans)})")

    def save(self, path: str) -> None:
        tensors = {"heads": self.heads, "neurons": self.neurons}
        if self.square_sums is not None:
            tensors.update(heads_square_sums=self.square_sums[0], neurons_square_sums=self.square_sums[1])
        _save(path, tensors, self._header())

    def _header(self) -> dict:
        return {"kind": "scores", "spans": self.spans, "model": self.model, "n_pairs": self.n_pairs, "meta": self.meta,
                "task": self.task, "modality": self.modality}

    @classmethod
    def load(cls, path: str) -> "Scores":
        tensors, h = _load(path, "scores")
        squares = (tensors["heads_square_sums"], tensors["neurons_square_sums"]) if "heads_square_sums" in tensors else None
        return cls(tensors["heads"], tensors["neurons"], _spans(h), h["model"], h["n_pairs"], h["meta"],
                   square_sums=squares, task=h.get("task"), modality=h.get("modality"))


def _top_mask(scores: torch.Tensor, k: int, batched: bool = False) -> torch.Tensor:
    """Boolean mask of the k entries of largest |score|, as a stable sort on (−|score|, flat index) takes them:
    entries tied with the k-th largest go to the lowest flat indices (topk alone leaves ties to its kernel).
    batched: of each scores[b] (k of every row)."""
    flat = scores.abs().flatten(int(batched))
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.topk(flat, k).values[..., -1:]  # O(n): no full sort
    kept = flat >= kth
    if bool((count(kept.view(-1, flat.shape[-1])) == k).all()):  # no tie crosses the k-th place (the usual case): no running count
        return kept.view_as(scores)
    above, tied = flat > kth, flat == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied entries fit, taken from the lowest index
    return (above | (tied & (tied.cumsum(-1) <= room))).view_as(scores)


@dataclass
class Circuit:
    """Head and neuron node sets (boolean masks) with the token spans they refer to, and where they come from:
    model, task and modality (None: not recorded); meta: the selection (fraction or count) and the scores' settings.
    Combining or labelling with another model's, task's or modality's circuit, scores or pair is a ValueError."""

    heads: torch.Tensor  # bool (L, H, T)
    neurons: torch.Tensor  # bool (L, I, T)
    spans: dict[str, tuple[int, int]]
    model: str
    meta: dict = field(default_factory=dict)
    task: str | None = None
    modality: str | None = None

    @classmethod
    def from_scores(cls, scores: Scores, *, fraction: float | None = None, count: int | None = None) -> "Circuit":
        """Top ⌊f·N⌋ heads and top ⌊f·N⌋ neurons by |score|, ranked separately (or the top `count` of each)."""
        if (fraction is None) == (count is None):
            raise ValueError("give exactly one of fraction or count")
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        if count is not None and count < 0:
            raise ValueError(f"count must be non-negative, got {count}")
        for t in (scores.heads, scores.neurons):
            finite(t, f"Circuit.from_scores (scores of {scores.model})")

        def k(t):
            return min(count, t.numel()) if count is not None else int(fraction * t.numel())

        meta = {"fraction": fraction, "count": count, "scores": scores.meta}
        return cls(_top_mask(scores.heads, k(scores.heads)), _top_mask(scores.neurons, k(scores.neurons)),
                   scores.spans, scores.model, meta, scores.task, scores.modality)

    @classmethod
    def resampled(cls, scores: Scores, idx, *, fraction: float) -> "Circuit":
        """The top-`fraction` circuit of `scores` resampled by each row of the (B, P') index matrix idx, as one
        Circuit with a leading resample axis: heads (B, L, H, T), neurons (B, L, I, T) (`Scores.resampled`)."""
        for t in scores.per_pair or ():  # finite per-pair values give finite means (checked once, not per draw)
            finite(t, f"Circuit.resampled (scores of {scores.model})")
        h, n = scores.resampled(idx)
        return cls(_top_mask(h, int(fraction * scores.heads.numel()), batched=True),
                   _top_mask(n, int(fraction * scores.neurons.numel()), batched=True), scores.spans, scores.model,
                   {"fraction": fraction, "count": None, "scores": scores.meta}, scores.task, scores.modality)

    @classmethod
    def full(cls, like: "Circuit | Scores", value: bool = True) -> "Circuit":
        """Every node (value=True) or no node (value=False) of the layout of `like`."""
        heads = torch.full(like.heads.shape, value, dtype=torch.bool)
        neurons = torch.full(like.neurons.shape, value, dtype=torch.bool)
        return cls(heads, neurons, like.spans, like.model, task=like.task, modality=like.modality)

    @property
    def n_heads(self) -> int:
        return int(self.heads.sum())

    @property
    def n_neurons(self) -> int:
        return int(self.neurons.sum())

    def check_match(self, other, what: str = "circuit") -> None:
        """Refuse `other` (a Circuit, Scores or Pair) of another model, task or modality, or of another token
        layout (positions, spans); a field either side left unrecorded (None) is not compared."""
        prompt = getattr(other, "prompt", None)  # a Pair names its task and modality in its prompt
        theirs = {"model": getattr(other, "model", None), "task": (prompt or other).task,
                  "modality": (prompt or other).modality}
        for name, value in theirs.items():
            mine = getattr(self, name)
            if mine is not None and value is not None and mine != value:
                raise ValueError(f"{what} is of {name} {value!r}, this circuit of {mine!r} ({self!r})")
        T = other.length if prompt is not None else other.heads.shape[-1]
        if T != self.heads.shape[-1] or dict(other.spans) != dict(self.spans):
            raise ValueError(f"{what} has {T} positions (tokens), spans {_span_text(other.spans)}; this circuit "
                             f"{self.heads.shape[-1]}, {_span_text(self.spans)}")

    def _combine(self, other: "Circuit", op) -> "Circuit":
        if self.heads.shape != other.heads.shape or self.neurons.shape != other.neurons.shape:
            raise ValueError(f"circuits have different layouts: {tuple(self.heads.shape)} vs {tuple(other.heads.shape)}")
        self.check_match(other)
        return Circuit(op(self.heads, other.heads), op(self.neurons, other.neurons), self.spans, self.model,
                       task=self.task or other.task, modality=self.modality or other.modality)

    def __and__(self, other):
        return self._combine(other, torch.logical_and)

    def __or__(self, other):
        return self._combine(other, torch.logical_or)

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a & ~b)

    def __eq__(self, other):
        return torch.equal(self.heads, other.heads) and torch.equal(self.neurons, other.neurons)

    def span_mask(self, span: str) -> torch.Tensor:
        """(T,) bool, True at the positions of `span` ("D", "Q" or "G")."""
        start, end = self.spans[span]
        mask = torch.zeros(self.heads.shape[-1], dtype=torch.bool)
        mask[start:end] = True
        return mask

    def restrict(self, span: str) -> "Circuit":
        """Only the nodes at positions of `span`."""
        m = self.span_mask(span)
        return Circuit(self.heads & m, self.neurons & m, self.spans, self.model, dict(self.meta, span=span), self.task,
                       self.modality)

    def span_of(self, position: int) -> str | None:
        """The span ("D", "Q" or "G") holding `position`; None for the template around them."""
        return next((s for s, (a, b) in self.spans.items() if a <= position < b), None)

    def nodes(self, pair=None, scores: Scores | None = None) -> list[dict]:
        """One record per node: kind ("head"/"neuron"), layer, unit, position, span (D/Q/G or None).

        With `pair` (a data.pairs.Pair of this layout) also its token (`Pair.tokens`) and patch ((row, col)
        of an image-patch token, else None); with `scores` also its score, and the records sorted by |score|,
        largest first (else by kind, layer, unit, position). One dict per node: for a circuit of millions of
        neurons, restrict it to a span or take a `count` first. A pair or scores of another model, task,
        modality or token layout is refused (`check_match`).
        """
        if pair is not None:
            self.check_match(pair, "pair")
        if scores is not None:
            self.check_match(scores, "scores")
        if scores is not None and (scores.heads.shape, scores.neurons.shape) != (self.heads.shape, self.neurons.shape):
            raise ValueError(f"scores of layout {tuple(scores.heads.shape)} do not fit the circuit's "
                             f"{tuple(self.heads.shape)}")
        records = []
        for kind, mask in (("head", self.heads), ("neuron", self.neurons)):
            for layer, unit, pos in mask.nonzero().tolist():
                r = {"kind": kind, "layer": layer, "unit": unit, "position": pos, "span": self.span_of(pos)}
                if pair is not None:
                    r.update(token=pair.tokens[pos], patch=pair.grid[2].get(pos))
                if scores is not None:
                    r["score"] = float((scores.heads if kind == "head" else scores.neurons)[layer, unit, pos])
                records.append(r)
        if scores is not None:
            records.sort(key=lambda r: -abs(r["score"]))
        return records

    def summary(self) -> dict[str, dict[str, list[int]]]:
        """Nodes per span and layer: {span: {"heads": [count per layer], "neurons": [...]}} for D, Q, G and
        "other" (the template around them, when it holds nodes)."""
        spans = [self.span_of(t) or "other" for t in range(self.heads.shape[-1])]
        out = {}
        for span in (*self.spans, "other"):
            at = torch.tensor([s == span for s in spans])
            counts = {kind: mask[..., at].sum((1, 2)).tolist() for kind, mask in (("heads", self.heads),
                                                                                   ("neurons", self.neurons))}
            if span != "other" or any(counts["heads"] + counts["neurons"]):
                out[span] = counts
        return out

    def __repr__(self) -> str:
        fraction = self.meta.get("fraction")
        at = f" (top {fraction:.1%})" if fraction is not None else ""
        L, _, T = self.heads.shape
        return (f"Circuit({_origin(self)}, {self.n_heads}/{self.heads.numel()} heads + {self.n_neurons}/"
                f"{self.neurons.numel()} neurons{at}, {L} layers x {T} positions, {_span_text(self.spans)})")

    def save(self, path: str) -> None:
        header = {"kind": "circuit", "spans": self.spans, "model": self.model, "meta": self.meta, "task": self.task,
                  "modality": self.modality}
        _save(path, {"heads": self.heads.to(torch.uint8), "neurons": self.neurons.to(torch.uint8)}, header)

    @classmethod
    def load(cls, path: str, *, model: str | None = None) -> "Circuit":
        """Load a circuit; with `model`, refuse one saved for another model."""
        tensors, h = _load(path, "circuit")
        if model is not None and h["model"] != model:
            raise ValueError(f"{path} holds a circuit for {h['model']!r}, not {model!r}")
        return cls(tensors["heads"].bool(), tensors["neurons"].bool(), _spans(h), h["model"], h["meta"], h.get("task"),
                   h.get("modality"))


def _origin(obj) -> str:
    """"toy, counting/image" (model, and task/modality where recorded)."""
    return obj.model + (f", {obj.task or '?'}/{obj.modality or '?'}" if obj.task or obj.modality else "")


def _span_text(spans: dict) -> str:
    """"D 3:19 Q 19:25 G 25:27"."""
    return " ".join(f"{s} {a}:{b}" for s, (a, b) in spans.items())


def _spans(header: dict) -> dict[str, tuple[int, int]]:
    return {k: tuple(v) for k, v in header["spans"].items()}


#: What each kind of file holds: its tensors and its header fields.
_CONTENTS = {"circuit": (("heads", "neurons"), ("spans", "model", "meta")),
             "scores": (("heads", "neurons"), ("spans", "model", "n_pairs", "meta"))}


def _save(path: str, tensors: dict, header: dict) -> None:
    """Write safetensors with a JSON header (format version, sha256 of the tensors) atomically (temp file + rename)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    header = {**header, "format_version": FORMAT_VERSION, "sha256": fingerprint(tensors)}
    meta = {"modality_circuits": json.dumps(header)}
    with atomic(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def _load(path: str, kind: str) -> tuple[dict, dict]:
    """Tensors and header of a file `_save` wrote; anything else (damaged, foreign, another kind) is one ValueError.

    Files written before the checksum was added are read without it."""
    from safetensors import safe_open

    expected = f"expected a modality_circuits {kind} file (safetensors with a JSON header)"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file; {expected}")
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get("modality_circuits")
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ValueError(f"{path} is unreadable or truncated ({type(err).__name__}: {err}); {expected}") from None
    if raw is None:
        raise ValueError(f"{path} was not written by modality_circuits (no header); {expected}")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} has a garbled header ({err}); {expected}") from None
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        found = header.get("format_version") if isinstance(header, dict) else None
        raise ValueError(f"{path} has format version {found}; this version reads {FORMAT_VERSION}")
    if header.get("kind") != kind:
        raise ValueError(f"{path} holds {header.get('kind')}, not {kind}")
    names, fields = _CONTENTS[kind]
    missing = [n for n in names if n not in tensors] + [f for f in fields if f not in header]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; {expected}")
    if "sha256" in header and fingerprint(tensors) != header["sha256"]:
        raise ValueError(f"{path} is damaged: its tensors do not match the checksum saved with them")
    return tensors, header
