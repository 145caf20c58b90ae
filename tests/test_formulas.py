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
    half = bootstrap(lambda i: float("nan") if i[0] % 2 else 1.0, 10, resamples=50)  # some draws undefined
    assert half.low == half.high == 1.0
    none = bootstrap(lambda i: float("nan"), 4, resamples=10)
    assert math.isnan(none.low) and math.isnan(none.high)
    with pytest.raises(ValueError, match="at least one prompt"):
        bootstrap(lambda i: 0.0, 0)
