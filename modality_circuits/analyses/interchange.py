"""Cross-modal interchange of sub-circuits (docs/method.md section 6).

Replace the target circuit's D, Q or G sub-circuit by the source circuit's, mapped to the
target's positions, and score faithfulness against a random sub-circuit of the same size
(baseline) and the unchanged circuit (oracle):
    score = (F(swapped) − F(random)) / (F(original) − F(random)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..circuits.circuit import Circuit
from ..circuits.metrics import faithfulness_value, faithfulness_values
from ..circuits.stats import CI, bootstrap
from ..data.pairs import SPANS, Pair
from ..methods.ablation import ablation_lds

# Below this margin F(original) − F(random) the score's denominator is noise: the span's own
# sub-circuit is hardly more faithful than a random one of its size, and the ratio is not interpretable.
MIN_MARGIN = 0.05


def map_span(source: Circuit, target: Circuit, span: str) -> Circuit:
    """`source`'s nodes in `span`, placed at `target`'s positions.

    Q/G: aligned by offset from the span end. D: position-free — a (layer, unit) present at
    any source data position is placed at every target data position.
    """
    (s0, s1), (t0, t1) = source.spans[span], target.spans[span]
    heads, neurons = torch.zeros_like(target.heads), torch.zeros_like(target.neurons)
    if span == "D":
        heads[..., t0:t1] = source.heads[..., s0:s1].any(-1, keepdim=True)
        neurons[..., t0:t1] = source.neurons[..., s0:s1].any(-1, keepdim=True)
    else:
        n = min(s1 - s0, t1 - t0)
        heads[..., t1 - n:t1] = source.heads[..., s1 - n:s1]
        neurons[..., t1 - n:t1] = source.neurons[..., s1 - n:s1]
    return Circuit(heads, neurons, target.spans, target.model, {"mapped_from": source.meta, "span": span}, target.task,
                   target.modality)


DRAWS = ("uniform", "reference")


def random_like(sub: Circuit, span: str, generator: torch.Generator, draw: str = "uniform") -> Circuit:
    """A random sub-circuit with as many head and neuron nodes as `sub`, inside `span`.

    draw="uniform": that many distinct nodes, uniformly among the span's. draw="reference": the reference
    code's draw, emulated: layer, unit and position each from randint-style ranges whose upper bound is
    included (one past the last), with replacement; draws outside the model or span and repeats are lost,
    so the sub-circuit is smaller (docs/method.md section 11)."""
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
    start, end = sub.spans[span]
    out = []
    for mask in (sub.heads, sub.neurons):
        region = mask[..., start:end]
        count = int(region.sum())
        full = torch.zeros_like(mask)
        if draw == "uniform":
            pick = torch.zeros(region.numel(), dtype=torch.bool)
            pick[torch.randperm(region.numel(), generator=generator)[:count]] = True
            full[..., start:end] = pick.view_as(region)
        else:
            (layers, units, length), size = region.shape, (count,)
            li, ui, ti = (torch.randint(0, n + 1, size, generator=generator) for n in (layers, units, length))
            inside = (li < layers) & (ui < units) & (ti < length)
            full[li[inside], ui[inside], start + ti[inside]] = True
        out.append(full)
    return Circuit(*out, sub.spans, sub.model, task=sub.task, modality=sub.modality)


@dataclass
class Interchange:
    """One direction of one span swap: faithfulness of each variant and the normalised score."""

    span: str
    f_original: float
    f_swapped: float
    f_random: list[float]  # one per random draw
    score: float  # with the mean random faithfulness
    score_draws: list[float]  # the score against each random draw (its spread)
    ci: CI  # bootstrap over prompts of `score`
    lds: torch.Tensor  # (4 + n_random, P): full, empty, original, swapped, random draws
    aggregation: str = "ratio_of_means"  # of F, as `circuits.metrics.faithfulness_value`

    @property
    def margin(self) -> float:
        """F(original) − mean F(random): the score's denominator."""
        return margin(self.f_original, self.f_random)

    @property
    def interpretable(self) -> bool:
        return readable(self.score, self.margin)

    def resampled(self, idx) -> torch.Tensor:
        """`score` recomputed on the pairs of each row of the (B, P) index matrix idx (one bootstrap draw a row): (B,)."""
        return _scores(self.lds, idx, self.aggregation)

    def __repr__(self) -> str:
        mean_random = sum(self.f_random) / len(self.f_random)
        score = self.ci if self.interpretable else f"n/a (margin {self.margin:.3f}: the denominator is noise)"
        return (f"Interchange(span {self.span}: score {score}; "
                f"F original {self.f_original:.3f}, swapped {self.f_swapped:.3f}, random {mean_random:.3f} "
                f"({len(self.f_random)} draws); margin {self.margin:.3f})")


def margin(f_original: float, f_random: list[float]) -> float:
    """F(original) − mean F(random draws): the denominator of the interchange score."""
    return f_original - sum(f_random) / len(f_random)


def readable(score: float, margin: float) -> bool:
    """Whether a score can be read: finite, and its denominator at least MIN_MARGIN."""
    return math.isfinite(score) and margin >= MIN_MARGIN


def _faith(lds: torch.Tensor, idx, aggregation: str) -> list[float]:
    """F of rows 2.. of lds (rows 0, 1: full model and empty circuit) on the pairs idx."""
    return [faithfulness_value(ld[idx], lds[0][idx], lds[1][idx], aggregation) for ld in lds[2:]]


def _norm(f_swapped: float, f_original: float, f_random: float) -> float:
    return (f_swapped - f_random) / (f_original - f_random) if f_original != f_random else float("nan")


def _scores(lds: torch.Tensor, idx, aggregation: str) -> torch.Tensor:
    """(B,) float64 score on the pairs of each row of the (B, P) index matrix idx (`_norm` of `_faith`, elementwise)."""
    at = lds[:, torch.as_tensor(idx)]  # (4 + n_random, B, P)
    f = faithfulness_values(at[2:], at[0], at[1], aggregation).double()
    f_random = sum(f[2:]) / len(f[2:])
    return torch.where(f[0] != f_random, (f[1] - f_random) / (f[0] - f_random), torch.nan)


def interchange(model, target: Circuit, source: Circuit, pairs: list[Pair], span: str, *, n_random: int = 5,
                seed: int = 0, resamples: int = 1000, draw: str = "uniform",
                aggregation: str = "ratio_of_means", progress: bool = True) -> Interchange:
    """Swap `span` of `target` (evaluated on `pairs`, the target's modality) for `source`'s mapped sub-circuit."""
    if span not in SPANS:
        raise ValueError(f"span must be one of {', '.join(SPANS)}, got {span!r}")
    if not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be an integer >= 1 (the random baseline needs a draw), got {n_random!r}")
    rest = target - target.restrict(span)
    mapped = map_span(source, target, span)
    gen = torch.Generator().manual_seed(seed)
    randoms = [rest | random_like(mapped, span, gen, draw) for _ in range(n_random)]
    circuits = [Circuit.full(target, True), Circuit.full(target, False), target, rest | mapped, *randoms]
    lds = ablation_lds(model, circuits, pairs, progress=progress)
    f = _faith(lds, torch.arange(len(pairs)), aggregation)
    ci = bootstrap(lambda idx: _scores(lds, idx, aggregation), len(pairs), resamples=resamples, seed=seed,
                   vectorised=True)
    return Interchange(span, f[0], f[1], f[2:], ci.value, [_norm(f[1], f[0], r) for r in f[2:]], ci, lds, aggregation)


@dataclass
class CrossInterchange:
    """Both directions of one span swap and the study's score: their mean, bootstrapped over both prompt sets."""

    span: str
    visual: Interchange  # the visual circuit with the textual span, on visual prompts
    text: Interchange  # the textual circuit with the visual span, on textual prompts
    score: CI

    @property
    def interpretable(self) -> bool:
        return self.visual.interpretable and self.text.interpretable

    def __repr__(self) -> str:
        if not self.interpretable:  # a ratio whose denominator is noise is not shown
            margins = f"margins visual {self.visual.margin:.3f}, text {self.text.margin:.3f}"
            return f"CrossInterchange({self.span}: score n/a ({margins}: the denominator is noise))"
        return (f"CrossInterchange({self.span}: score {self.score}, visual {self.visual.score:.3f}, "
                f"text {self.text.score:.3f})")


def interchange_both(model, text: Circuit, image: Circuit, text_pairs: list[Pair], image_pairs: list[Pair], span: str,
                     *, n_random: int = 5, seed: int = 0, resamples: int = 1000, draw: str = "uniform",
                     aggregation: str = "ratio_of_means", progress: bool = True) -> CrossInterchange:
    """The study's interchange of `span`: both directions, their mean score with a bootstrap over both prompt sets."""
    kw = dict(n_random=n_random, seed=seed, resamples=10, draw=draw, aggregation=aggregation, progress=progress)
    visual = interchange(model, image, text, image_pairs, span, **kw)
    textual = interchange(model, text, image, text_pairs, span, **kw)
    score = bootstrap(lambda i, j: (visual.resampled(i) + textual.resampled(j)) / 2,
                      (len(image_pairs), len(text_pairs)), resamples=resamples, vectorised=True)
    return CrossInterchange(span, visual, textual, score)
