"""The vectorised bootstrap (docs/method.md section 9): every statistic evaluated on all resamples at once equals
its per-resample definition, written here as a plain loop over the draws with numpy and scipy."""
import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from modality_circuits.analyses.interchange import Interchange
from modality_circuits.analyses.overlap import resampled_niou
from modality_circuits.circuits.circuit import Circuit, Scores
from modality_circuits.circuits.metrics import faithfulness_values
from modality_circuits.circuits.stats import bootstrap, bootstrap_mean, draws, index_matrices, interval

B = 200


def _loop_draws(sizes, resamples, seed):
    """The generator as documented: draw b takes set s's n_s indices in turn from one default_rng(seed) stream."""
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, k, k) for k in sizes) for _ in range(resamples)]


def _percentile(values, level=0.95):
    v = np.array(values, dtype=float)
    v = v[np.isfinite(v)]
    return np.quantile(v, [(1 - level) / 2, (1 + level) / 2])


def _check(ci, point, values):
    """ci against the point and the plain loop's per-resample values."""
    assert ci.value == pytest.approx(point, rel=1e-5, abs=1e-6)
    lo, hi = _percentile(values)
    assert (ci.low, ci.high) == pytest.approx((lo, hi), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("sizes", [(7,), (12, 5), (3, 4, 2)])
def test_index_matrices_are_the_documented_draws(sizes):
    got = index_matrices(sizes if len(sizes) > 1 else sizes[0], B, seed=3)
    for b, want in enumerate(_loop_draws(sizes, B, 3)):
        for m, w in zip(got, want):
            np.testing.assert_array_equal(m[b], w)
    if len(sizes) == 1:  # one set: exactly default_rng(seed).integers(0, n, (B, n))
        np.testing.assert_array_equal(got[0], np.random.default_rng(3).integers(0, sizes[0], (B, sizes[0])))
    again = index_matrices(sizes if len(sizes) > 1 else sizes[0], B, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(got, again))
    assert not np.array_equal(index_matrices(sizes[0], B, seed=4)[0], got[0])
    assert all(np.array_equal(np.stack([d[j] for d in draws(sizes if len(sizes) > 1 else sizes[0], B, 3)]), got[j])
               for j in range(len(sizes)))


def test_bootstrap_vectorised_and_looped_agree():
    x, y = np.random.default_rng(0).normal(size=(2, 9))
    looped = bootstrap(lambda i, j: x[i].mean() - np.median(y[j]), (9, 9), resamples=B)
    vectorised = bootstrap(lambda i, j: x[i].mean(-1) - np.median(y[j], -1), (9, 9), resamples=B, vectorised=True)
    assert looped == vectorised
    values = [x[i].mean() - np.median(y[j]) for i, j in _loop_draws((9, 9), B, 0)]
    _check(vectorised, x.mean() - np.median(y), values)


@pytest.mark.parametrize("kind", ["numpy", "torch", "rows"])
def test_bootstrap_mean_is_the_mean_of_each_draw(kind):
    rng = np.random.default_rng(1)
    x = {"numpy": (rng.random(11) > 0.4).astype(np.float32), "torch": torch.tensor(rng.normal(size=11)),
         "rows": rng.normal(size=(3, 11)).astype(np.float32)}[kind]
    a = np.asarray(x, dtype=float)
    values = [a[..., idx].mean() for (idx,) in _loop_draws((11,), B, 5)]
    _check(bootstrap_mean(x, resamples=B, seed=5), a.mean(), values)


@pytest.mark.parametrize("aggregation", ["ratio_of_means", "mean_of_ratios"])
def test_faithfulness_of_every_draw(aggregation):
    rng = np.random.default_rng(2)
    full, empty = rng.normal(3, 1, 10), rng.normal(0, 1, 10)
    circuit = empty + rng.uniform(0.2, 1.0, 10) * (full - empty)

    def faith(idx):  # section 4's F of the pairs idx, by hand
        c, f, e = circuit[idx], full[idx], empty[idx]
        if aggregation == "ratio_of_means":
            return (sum(c) / len(c) - sum(e) / len(e)) / (sum(f) / len(f) - sum(e) / len(e))
        return sum((ci - ei) / (fi - ei) for ci, fi, ei in zip(c, f, e)) / len(c)

    lds = [torch.tensor(v, dtype=torch.float32) for v in (circuit, full, empty)]
    ci = bootstrap(lambda i: faithfulness_values(*(v[i] for v in lds), aggregation), 10, resamples=B, vectorised=True)
    _check(ci, faith(np.arange(10)), [faith(idx) for (idx,) in _loop_draws((10,), B, 0)])


def test_interchange_score_of_every_draw():
    rng = np.random.default_rng(3)
    P = 8
    full, empty = rng.normal(3, 0.5, P), rng.normal(0, 0.5, P)
    rows = [empty + rng.uniform(0, 1, P) * (full - empty) for _ in range(2 + 5)]  # original, swapped, 5 random
    lds = torch.tensor(np.stack([full, empty, *rows]), dtype=torch.float32)
    full, empty, *rows = lds.double().numpy()  # the hand computation reads the same float32 values
    inter = Interchange("Q", 0, 0, [0], 0, [0], None, lds)

    def score(idx):  # section 6 by hand: (F(swapped) - mean F(random)) / (F(original) - mean F(random))
        f = [(r[idx].mean() - empty[idx].mean()) / (full[idx].mean() - empty[idx].mean()) for r in rows]
        base = sum(f[2:]) / len(f[2:])
        return (f[1] - base) / (f[0] - base)

    got = inter.resampled(np.stack([idx for (idx,) in _loop_draws((P,), B, 0)])).numpy()
    want = np.array([score(idx) for (idx,) in _loop_draws((P,), B, 0)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    ci = bootstrap(lambda i, j: (inter.resampled(i) + inter.resampled(j)) / 2, (P, P), resamples=B, vectorised=True)
    _check(ci, score(np.arange(P)), [(score(i) + score(j)) / 2 for i, j in _loop_draws((P, P), B, 0)])


def _by_hand_niou(a, b):
    """max(0, (IoU - E[IoU]) / (1 - E[IoU])) with E[IoU] from scipy's hypergeometric law (section 5)."""
    n, ka, kb = a.size, int(a.sum()), int(b.sum())
    union = int((a | b).sum())
    if union == 0:
        return np.nan
    x = np.arange(max(0, ka + kb - n), min(ka, kb) + 1)
    base = float((hypergeom.pmf(x, n, ka, kb) * x / (ka + kb - x)).sum())
    value = int((a & b).sum()) / union
    return 1.0 if base >= 1 else max(0.0, (value - base) / (1 - base))


def _top(mean, fraction):
    k = int(fraction * mean.size)
    mask = np.zeros(mean.size, dtype=bool)
    mask[np.argsort(-np.abs(mean.ravel()), kind="stable")[:k]] = True
    return mask.reshape(mean.shape)


def test_resampled_overlap_of_every_draw():
    """Circuit.resampled and resampled_niou against per-draw circuits (numpy means, argsort top-k) and nIoU by hand."""
    rng = np.random.default_rng(4)
    spans = {"D": (0, 3), "Q": (3, 5), "G": (5, 6)}
    L, H, I, T, fraction = 2, 3, 5, 6, 0.2
    per_pair = [(rng.normal(size=(P, L, H, T)).astype(np.float32), rng.normal(size=(P, L, I, T)).astype(np.float32))
                for P in (6, 4)]
    scores = [Scores(torch.tensor(h.mean(0)), torch.tensor(n.mean(0)), spans, "m", len(h),
                     per_pair=(torch.tensor(h), torch.tensor(n))) for h, n in per_pair]
    idx = index_matrices((6, 4), B, seed=0)
    got = resampled_niou(*(Circuit.resampled(s, i, fraction=fraction) for s, i in zip(scores, idx)))

    def span_score(text, image, span):
        a0, a1 = spans[span]
        per_unit = []
        for t, v in zip(text, image):
            if span == "D":
                t, v = t[..., a0:a1].any(-1), v[..., a0:a1].any(-1)
            else:
                t, v = t[..., a0:a1], v[..., a0:a1]
            per_unit.append(_by_hand_niou(t, v))
        finite = [u for u in per_unit if np.isfinite(u)]
        return sum(finite) / len(finite) if finite else np.nan

    for b in range(B):
        circuits = [[_top(x[i].astype(np.float64).mean(0), fraction) for x in pp]
                    for pp, i in zip(per_pair, (idx[0][b], idx[1][b]))]
        for span in spans:
            assert got[span][b] == pytest.approx(span_score(*circuits, span), abs=1e-9, nan_ok=True), (b, span)


def test_undefined_resamples_are_counted_and_above_one_percent_void_the_interval():
    x = np.arange(1.0, 21.0)

    def stat(i):  # undefined on a draw holding prompt 2 three times or more: a few percent of the draws
        return np.where((i == 2).sum(-1) >= 3, np.nan, x[i].mean(-1))

    ci = bootstrap(stat, 20, resamples=B, vectorised=True)
    n_bad = sum(list(idx).count(2) >= 3 for (idx,) in _loop_draws((20,), B, 0))
    assert ci.value == x.mean()
    assert n_bad > 0.01 * B and ci.dropped == n_bad and ci.resamples == B
    assert np.isnan(ci.low) and np.isnan(ci.high) and ci.reason == f"{n_bad}/{B} resamples undefined"
    assert ci.as_dict()["reason"] == ci.reason and "n/a" in str(ci)
    few = interval(1.0, np.r_[np.arange(299.0), np.nan, np.nan, np.nan])  # 3 of 302: under 1 %
    assert few.dropped == 3 and few.reason is None
    assert (few.low, few.high) == pytest.approx(tuple(np.quantile(np.arange(299.0), [0.025, 0.975])))
    assert "reason" not in few.as_dict()
