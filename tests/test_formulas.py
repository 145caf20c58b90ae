"""Edge cases of the formula code, by hand: the cases scripts/mutation.sh found no test for (scripts/mutation_notes.md)."""
import math

import numpy as np
import pytest
import torch

from modality_circuits.circuits.metrics import expected_iou, faithfulness_value, iou, niou
from modality_circuits.circuits.stats import bootstrap


def test_bad_formula_names_are_named_in_the_error():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="unknown aggregation 'median'.*ratio_of_means"):
        faithfulness_value(x, x, x, "median")
    with pytest.raises(ValueError, match="formula must be one of .*got 'other'"):
        niou(x.bool(), x.bool(), "other")


def test_empty_sets_have_no_iou_and_full_sets_overlap_completely():
    empty, full = torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)
    assert math.isnan(iou(empty, empty)) and math.isnan(expected_iou(5, 0, 0))
    for formula in ("normalised", "unclipped", "reference"):
        assert math.isnan(niou(empty, empty, formula))
    # both sets the whole universe: b = 1 and IoU = 1; (IoU − b) / (1 − b) is 0/0, the score is 1 by definition
    assert expected_iou(5, 5, 5) == pytest.approx(1.0)
    assert niou(full, full) == 1.0 and niou(full, full, "unclipped") == 1.0
    assert niou(full, full, "reference") == pytest.approx(1 - 2 * 1.0)


def test_expected_iou_by_enumeration_of_small_universes():
    """E[IoU] over every pair of subsets of the given sizes (exact, no Monte Carlo)."""
    import itertools

    for n, sa, sb in ((4, 1, 2), (5, 2, 3), (6, 3, 3), (5, 0, 2), (5, 5, 1)):
        subsets_a, subsets_b = (list(itertools.combinations(range(n), k)) for k in (sa, sb))
        total = sum(len(set(x) & set(y)) / len(set(x) | set(y)) for x in subsets_a for y in subsets_b)
        assert expected_iou(n, sa, sb) == pytest.approx(total / (len(subsets_a) * len(subsets_b)), abs=1e-12)


def test_faithfulness_aggregations_by_hand():
    ld_c, full, empty = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0]), torch.tensor([0.0, 1.0])
    assert faithfulness_value(ld_c, full, empty) == pytest.approx((2.0 - 0.5) / (3.0 - 0.5))
    assert faithfulness_value(ld_c, full, empty, "mean_of_ratios") == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_bootstrap_percentile_interval_properties():
    """The point value is the statistic on every prompt; the interval holds the central `level` of the resampled
    statistics (so it narrows with level), non-finite draws are left out, and tuple sizes give one index array
    per prompt set."""
    x = np.random.default_rng(1).normal(0.0, 1.0, 100)
    wide, narrow = (bootstrap(lambda i: x[i].mean(), 100, resamples=400, level=lv) for lv in (0.95, 0.5))
    assert wide.value == pytest.approx(x.mean())
    assert wide.low < narrow.low < narrow.high < wide.high
    assert (wide.high - wide.low) == pytest.approx(2 * 1.96 / 10, rel=0.2)
    assert (narrow.high - narrow.low) == pytest.approx(2 * 0.674 / 10, rel=0.25)
    seen = []
    both = bootstrap(lambda i, j: seen.append((len(i), len(j))) or float(len(i) + len(j)), (3, 7), resamples=5)
    assert both.value == 10.0 and set(seen) == {(3, 7)}
    half = bootstrap(lambda i: float("nan") if i[0] % 2 else 1.0, 10, resamples=50)  # many draws undefined
    assert math.isnan(half.low) and math.isnan(half.high) and half.dropped > 0.01 * 50 and half.reason
    none = bootstrap(lambda i: float("nan"), 4, resamples=10)
    assert math.isnan(none.low) and math.isnan(none.high)
    with pytest.raises(ValueError, match="at least one prompt"):
        bootstrap(lambda i: 0.0, 0)


def _random_circuit(spans, T, seed, L=2, H=3, I=4, p=0.4):
    from modality_circuits.circuits.circuit import Circuit

    g = torch.Generator().manual_seed(seed)
    return Circuit(torch.rand(L, H, T, generator=g) < p, torch.rand(L, I, T, generator=g) < p, spans, "m")


def test_overlap_by_hand_with_spans_of_different_lengths():
    """Every field of every span from explicit loops: D as the set of (layer, unit) present at any data position,
    Q and G position by position counted back from the span end over the shorter span's length."""
    from modality_circuits.analyses.overlap import overlap

    text = _random_circuit({"D": (0, 3), "Q": (3, 5), "G": (5, 6)}, 6, seed=3)
    visual = _random_circuit({"D": (0, 7), "Q": (7, 10), "G": (10, 12)}, 12, seed=4)

    def members(c, kind, span, length):
        mask = getattr(c, kind)
        start, end = c.spans[span]
        if span == "D":
            return {(l, u) for l in range(mask.shape[0]) for u in range(mask.shape[1])
                    if any(bool(mask[l, u, t]) for t in range(start, end))}
        return {(l, u, k) for l in range(mask.shape[0]) for u in range(mask.shape[1]) for k in range(length)
                if bool(mask[l, u, end - 1 - k])}

    for formula in ("normalised", "reference"):
        res = overlap(text, visual, niou_formula=formula)
        for span in "DQG":
            length = min(c.spans[span][1] - c.spans[span][0] for c in (text, visual))
            for kind in ("heads", "neurons"):
                a, b = members(text, kind, span, length), members(visual, kind, span, length)
                units = getattr(text, kind).shape[1]
                n = 2 * units * (1 if span == "D" else length)
                expect_iou = len(a & b) / len(a | b)
                base = expected_iou(n, len(a), len(b))
                expect = expect_iou - 2 * base if formula == "reference" else max(0.0, (expect_iou - base) / (1 - base))
                assert getattr(res[span], f"iou_{kind}") == pytest.approx(expect_iou)
                assert getattr(res[span], f"niou_{kind}") == pytest.approx(expect)
            assert res[span].niou == pytest.approx((res[span].niou_heads + res[span].niou_neurons) / 2)


def test_overlap_refuses_circuits_of_different_models():
    from modality_circuits.analyses.overlap import overlap

    spans = {"D": (0, 2), "Q": (2, 3), "G": (3, 4)}
    a = _random_circuit(spans, 4, seed=0)
    for other in (_random_circuit(spans, 4, seed=0, H=4), _random_circuit(spans, 4, seed=0, I=5)):
        with pytest.raises(ValueError, match="^circuits come from models of different sizes$"):
            overlap(a, other)


def test_default_back_patching_grid_by_hand():
    from modality_circuits.analyses.backpatch import default_configs

    small = default_configs(4)  # 2 windows × 4² / 2 = 16 <= 120: every layer
    assert small == [(s, d, w) for w in (1, 2) for d in range(4) for s in range(4) if d < s and s + w <= 4]
    large = default_configs(40)  # thinned: the smallest stride with 2 × (40 // stride)² / 2 <= 120 is 4
    grid = range(0, 40, 4)
    assert large == [(s, d, w) for w in (1, 2) for d in grid for s in grid if d < s and s + w <= 40]
    assert default_configs(40, windows=(1,), max_configs=10) == [(s, d, 1) for d in range(0, 40, 9)
                                                                  for s in range(0, 40, 9) if d < s]

    def stride(n, **kw):  # the grid's step, read off the configs
        return sorted({d for _, d, _ in default_configs(n, **kw)})[1]

    assert stride(11) == 2  # 2 × 11² / 2 = 121 > 120: thinned
    assert stride(10, max_configs=100) == 1  # exactly at the limit: kept
    assert stride(11, max_configs=30) == 2  # 2 × (11 // 2)² / 2 = 25 <= 30 (whole grid steps, not 5.5)


def test_resampled_scores_are_the_mean_over_the_drawn_pairs():
    """A bootstrap draw's scores: the plain mean of the drawn pairs' scores, repeats counted; with kept indices
    the nodes outside them are 0."""
    from modality_circuits.circuits.circuit import Scores

    g = torch.Generator().manual_seed(0)
    heads, neurons = torch.randn(4, 2, 3, 5, generator=g), torch.randn(4, 2, 2, 5, generator=g)
    s = Scores(heads.mean(0), neurons.mean(0), {"D": (0, 2), "Q": (2, 4), "G": (4, 5)}, "m", 4,
               per_pair=(heads, neurons))
    idx = np.array([3, 0, 3, 3, 1])
    r = s.resample(idx)
    torch.testing.assert_close(r.heads, torch.stack([heads[i] for i in idx]).mean(0))
    torch.testing.assert_close(r.neurons, torch.stack([neurons[i] for i in idx]).mean(0))
    assert r.n_pairs == 5
    keep_h, keep_n = torch.tensor([0, 7, 29]), torch.tensor([1, 19])
    kept = Scores(s.heads, s.neurons, s.spans, "m", 4, per_pair=(heads.flatten(1)[:, keep_h],
                                                                  neurons.flatten(1)[:, keep_n]), kept=(keep_h, keep_n))
    rk = kept.resample(idx)
    expect_h = torch.zeros(30)
    expect_h[keep_h] = torch.stack([heads[i] for i in idx]).mean(0).flatten()[keep_h]
    torch.testing.assert_close(rk.heads, expect_h.view(2, 3, 5))
    assert int((rk.neurons != 0).sum()) == 2
    with pytest.raises(ValueError, match="per_pair=True"):
        Scores(s.heads, s.neurons, s.spans, "m", 4).resample(idx)


def test_ci_as_dict():
    from modality_circuits.circuits.stats import CI

    assert CI(0.5, 0.25, 0.75).as_dict() == {"value": 0.5, "low": 0.25, "high": 0.75, "dropped": 0, "resamples": 0}


def test_span_masks_default_length_is_the_whole_span():
    from modality_circuits.analyses.overlap import span_masks

    c = _random_circuit({"D": (0, 3), "Q": (3, 7), "G": (7, 9)}, 9, seed=5)
    for span, (a, b) in c.spans.items():
        heads, neurons = span_masks(c, span)
        if span == "D":
            assert torch.equal(heads, c.heads[..., a:b].any(-1)) and torch.equal(neurons, c.neurons[..., a:b].any(-1))
        else:
            assert torch.equal(heads, c.heads[..., a:b]) and torch.equal(neurons, c.neurons[..., a:b])


@pytest.mark.parametrize("aggregation", ["ratio_of_means", "mean_of_ratios"])
def test_interchange_score_from_logit_differences_by_hand(aggregation):
    """Rows of lds: full model, empty circuit, original, swapped, two random draws; P = 3 pairs. F per row and the
    score (F(swapped) − mean F(random)) / (F(original) − mean F(random)), on a resample of the pairs."""
    from modality_circuits.analyses.interchange import Interchange

    lds = torch.tensor([[4.0, 6.0, 5.0], [0.0, 1.0, -1.0], [3.0, 5.0, 4.0], [2.0, 3.0, 1.0],
                        [1.0, 2.0, 0.0], [0.5, 1.5, 0.5]])
    idx = np.array([0, 2, 2])

    def f(row):
        full, empty, c = lds[0, idx], lds[1, idx], lds[row, idx]
        if aggregation == "ratio_of_means":
            return float((c.mean() - empty.mean()) / (full.mean() - empty.mean()))
        return float(((c - empty) / (full - empty)).mean())

    random = (f(4) + f(5)) / 2
    expect = (f(3) - random) / (f(2) - random)
    ic = Interchange("Q", 0.0, 0.0, [0.0], 0.0, [0.0], None, lds, aggregation)
    assert ic.resampled(idx) == pytest.approx(expect)

    flat = lds.clone()
    flat[4:] = flat[2]  # the random draws as faithful as the original: no denominator
    assert math.isnan(Interchange("Q", 0.0, 0.0, [0.0], 0.0, [0.0], None, flat, aggregation).resampled(idx))


def test_a_margin_of_exactly_min_margin_is_readable():
    from modality_circuits.analyses.interchange import MIN_MARGIN, margin, readable

    assert readable(0.3, MIN_MARGIN) and not readable(0.3, MIN_MARGIN - 1e-9)
    assert not readable(float("nan"), 1.0) and not readable(float("inf"), 1.0)
    assert margin(0.9, [0.2, 0.4, 0.6]) == pytest.approx(0.5)


def test_map_span_by_hand():
    """D: a (layer, unit) at any source data position fills every target data position; Q/G: the last
    min(lengths) positions, aligned from the span end; the result is the target's layout with a record of both."""
    from modality_circuits.analyses.interchange import map_span

    source = _random_circuit({"D": (1, 4), "Q": (4, 7), "G": (7, 8)}, 8, seed=6)
    source.meta = {"modality": "text"}
    target = _random_circuit({"D": (2, 9), "Q": (9, 11), "G": (11, 12)}, 12, seed=7)
    for span in "DQG":
        mapped = map_span(source, target, span)
        assert mapped.spans == target.spans and mapped.model == target.model
        assert mapped.meta == {"mapped_from": {"modality": "text"}, "span": span}
        for kind in ("heads", "neurons"):
            src, got = getattr(source, kind), getattr(mapped, kind)
            expect = torch.zeros_like(getattr(target, kind))
            (s0, s1), (t0, t1) = source.spans[span], target.spans[span]
            for l in range(src.shape[0]):
                for u in range(src.shape[1]):
                    if span == "D":
                        expect[l, u, t0:t1] = bool(src[l, u, s0:s1].any())
                    else:
                        for k in range(min(s1 - s0, t1 - t0)):
                            expect[l, u, t1 - 1 - k] = src[l, u, s1 - 1 - k]
            assert torch.equal(got, expect), (span, kind)


def test_uniform_random_draw_by_hand():
    """As many distinct nodes as the sub-circuit, all inside the span, reproducible from the generator, every cell
    equally likely (frequency over many draws); the result keeps the sub-circuit's spans and model."""
    from modality_circuits.analyses.interchange import random_like

    sub = _random_circuit({"D": (0, 2), "Q": (2, 5), "G": (5, 6)}, 6, seed=8)
    counts = [int(sub.heads[..., 2:5].sum()), int(sub.neurons[..., 2:5].sum())]
    hits = torch.zeros_like(sub.heads, dtype=torch.float32)
    for seed in range(400):
        drawn = random_like(sub, "Q", torch.Generator().manual_seed(seed))
        assert drawn.spans == sub.spans and drawn.model == sub.model and drawn.heads.dtype == torch.bool
        assert [int(drawn.heads.sum()), int(drawn.neurons.sum())] == counts
        assert not drawn.heads[..., :2].any() and not drawn.heads[..., 5:].any() and not drawn.neurons[..., 5:].any()
        hits += drawn.heads
    again = random_like(sub, "Q", torch.Generator().manual_seed(3))
    assert torch.equal(again.heads, random_like(sub, "Q", torch.Generator().manual_seed(3)).heads)
    share = hits[..., 2:5] / 400  # each of the span's cells: count / cells
    assert (share - counts[0] / share.numel()).abs().max() < 0.12
    with pytest.raises(ValueError, match="^draw must be one of .*got 'other'"):
        random_like(sub, "Q", torch.Generator(), draw="other")


def test_bootstrap_draws_are_seeded_resamples_of_every_prompt():
    from modality_circuits.circuits.stats import draws

    d = draws((3, 1), resamples=400, seed=5)
    assert len(d) == 400 and all(len(i) == 3 and len(j) == 1 for i, j in d)
    first = np.concatenate([i for i, _ in d])
    assert set(first.tolist()) == {0, 1, 2} and all((j == 0).all() for _, j in d)  # index 0 drawn too
    assert all(np.array_equal(a, b) for x, y in zip(d, draws((3, 1), resamples=400, seed=5)) for a, b in zip(x, y))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(d, draws((3, 1), resamples=400, seed=6)))
    assert len(draws(2)) == 1000 and [len(x) for x in draws(1, resamples=2)[0]] == [1]  # defaults; one prompt is enough
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(draws(4, resamples=3), draws(4, resamples=3, seed=0)))
    with pytest.raises(ValueError, match="^bootstrap needs at least one prompt in every set$"):
        draws((2, 0))


def test_bootstrap_interval_is_the_central_quantiles_of_the_seeded_draws():
    """Independent percentile bootstrap over the same index draws: np.quantile at (1 ∓ level)/2."""
    from modality_circuits.circuits.stats import draws

    x = np.random.default_rng(2).exponential(1.0, 30)  # skewed: the two tails differ
    ci = bootstrap(lambda i: x[i].mean(), 30, resamples=300, level=0.9, seed=4)
    means = np.array([x[i].mean() for (i,) in draws(30, 300, 4)])
    assert ci.low == pytest.approx(np.quantile(means, 0.05)) and ci.high == pytest.approx(np.quantile(means, 0.95))
    default = bootstrap(lambda i: x[i].mean(), 30)
    means = np.array([x[i].mean() for (i,) in draws(30, 1000, 0)])
    assert default.low == pytest.approx(np.quantile(means, 0.025)) and default.high == pytest.approx(np.quantile(means, 0.975))
    ints = bootstrap(lambda i: int(i.sum()), 5, resamples=50)  # integer statistics come back as floats
    assert isinstance(ints.low, float) and isinstance(ints.value, float)


def test_circuit_selection_boundaries():
    """fraction 0 and 1 and count 0 are allowed (empty and whole circuits); one node is the top-scoring one; bad
    requests are refused with their message; the circuit records how it was chosen."""
    from modality_circuits.circuits.circuit import Circuit, Scores

    g = torch.Generator().manual_seed(1)
    s = Scores(torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g), {"D": (0, 2), "Q": (2, 3),
                                                                                    "G": (3, 4)}, "m", 1)
    assert Circuit.from_scores(s, fraction=0.0).n_heads == 0 and Circuit.from_scores(s, count=0).n_neurons == 0
    whole = Circuit.from_scores(s, fraction=1.0)
    assert bool(whole.heads.all()) and bool(whole.neurons.all()) and whole.meta == {"fraction": 1.0, "count": None, "scores": {}}
    one = Circuit.from_scores(s, count=1)
    assert one.heads.view(-1).nonzero().item() == int(s.heads.abs().argmax())
    assert one.meta == {"fraction": None, "count": 1, "scores": {}}
    for kwargs, message in (({}, "^give exactly one of fraction or count$"),
                            ({"fraction": 0.5, "count": 2}, "^give exactly one of fraction or count$"),
                            ({"fraction": 1.5}, r"^fraction must lie in \[0, 1\], got 1.5$"),
                            ({"count": -1}, "^count must be non-negative, got -1$")):
        with pytest.raises(ValueError, match=message):
            Circuit.from_scores(s, **kwargs)


def test_count_of_large_masks_is_the_number_of_true_entries():
    """`count` sums bytes with a narrow accumulator: counts past 2^8 and 2^16 against numpy's count."""
    from modality_circuits.circuits.metrics import count

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 7, 20000, generator=g) < torch.tensor([0.01, 0.5, 1.0]).view(3, 1, 1)
    assert count(masks).tolist() == [int(np.count_nonzero(m.numpy())) for m in masks]
    assert count(masks)[2] == 140000
