"""Reference mode: each of the study code's choices as an option, checked against a hand computation."""
import pytest
import torch
from hooks import ig_scores

from modality_circuits.analyses.backpatch import backpatch, default_configs
from modality_circuits.analyses.interchange import random_like
from modality_circuits.circuits.circuit import Circuit
from modality_circuits.circuits.metrics import expected_iou, iou, niou
from modality_circuits.data.pairs import build_pairs
from modality_circuits.methods.ablation import logit_diffs
from modality_circuits.methods.attribution import attribute
from modality_circuits.study.steps import REFERENCE, Study


def test_abs_elementwise_head_score_is_the_absolute_per_element_ig(tiny):
    pair = build_pairs("counting", "image", tiny, n=1, seed=3)[0]
    scores = attribute(tiny, [pair], steps=3, head_score="abs_elementwise", progress=False)
    heads, neurons = ig_scores(tiny, pair, 3, absolute=True)
    torch.testing.assert_close(scores.heads, heads, atol=2e-5, rtol=1e-3)
    torch.testing.assert_close(scores.neurons, neurons, atol=2e-5, rtol=1e-3)
    assert (scores.heads >= 0).all()


def test_reference_visual_scores_match_the_official_definition(tiny):
    """The reference mode (|·| per element, image positions held at p where the gradient is taken, 1-D positions)
    on a visual pair, whose text is identical, so every score comes from the image: Δa from separate p' and p
    forwards, the gradient at the held points (plain torch hooks). Holding row 0 too gives all zeros."""
    pair = build_pairs("counting", "image", tiny, n=1, seed=0, positions="1d")[0]
    assert pair.inputs["input_ids"].equal(pair.cf_inputs["input_ids"])  # only the image differs
    scores = attribute(tiny, [pair], steps=3, head_score="abs_elementwise", interpolate="tokens", progress=False)
    hold = tiny.image_mask(pair.inputs["input_ids"][0]).cpu()
    heads, neurons = ig_scores(tiny, pair, 3, absolute=True, hold=hold)
    assert heads.abs().max() > 1e-6 and neurons.abs().max() > 1e-6  # the image moves the activations
    torch.testing.assert_close(scores.heads, heads, atol=2e-5 * heads.abs().max(), rtol=1e-3)
    torch.testing.assert_close(scores.neurons, neurons, atol=2e-5 * neurons.abs().max(), rtol=1e-3)


def test_1d_positions_are_the_plain_forward_with_arange_positions():
    from modality_circuits.testing import tiny_model

    qwen = tiny_model("qwen2_vl")
    own = build_pairs("counting", "image", qwen, n=2, seed=0)
    flat = build_pairs("counting", "image", qwen, n=2, seed=0, positions="1d")
    for p in flat:
        T = p.length
        with torch.no_grad():
            logits = qwen.hf_model(**{k: v for k, v in p.inputs.items() if k != "position_ids"},
                                   position_ids=torch.arange(T)[None]).logits[0, -1]
        expect = logits[p.answer_id] - logits[p.cf_answer_id]
        assert logit_diffs(qwen, [p])[0].item() == pytest.approx(expect.item(), abs=1e-5)
    assert (logit_diffs(qwen, flat) - logit_diffs(qwen, own)).abs().max() > 1e-6  # M-RoPE is not 1-D


def test_reference_niou_is_iou_minus_twice_the_baseline():
    a = torch.zeros(40, dtype=torch.bool)
    b = torch.zeros(40, dtype=torch.bool)
    a[:10], b[5:15] = True, True
    base = expected_iou(40, 10, 10)
    assert niou(a, b, "reference") == pytest.approx(iou(a, b) - 2 * base)
    assert iou(a, b) == pytest.approx(5 / 15)
    assert niou(a, a, "reference") < 1 < niou(a, a) + 1e-9  # identical sets: 1 only with the normalised formula


def test_reference_random_draw_includes_the_upper_bound_and_repeats():
    """The reference's draw: n draws of (layer, unit, position), each uniform over 0..bound inclusive, with
    replacement; out-of-range draws and repeats are lost. A cell of the span is hit by one draw with probability
    1/M, M = (L+1)(U+1)(T+1), so n draws keep N·(1 − (1 − 1/M)^n) distinct nodes on average (hand computation;
    an exclusive bound would keep N·(1 − (1 − 1/N)^n))."""
    L, H, I, T, span = 2, 3, 5, 9, (3, 7)
    heads, neurons = torch.zeros(L, H, T, dtype=torch.bool), torch.zeros(L, I, T, dtype=torch.bool)
    heads[:, :, 3:7], neurons[:, :2, 3:7] = True, True  # 24 heads: the whole span; 16 neurons
    sub = Circuit(heads, neurons, {"D": (0, 3), "Q": span, "G": (7, 9)}, "hand")
    sizes, hits = [], torch.zeros(L, H, T)
    for seed in range(300):
        drawn = random_like(sub, "Q", torch.Generator().manual_seed(seed), draw="reference")
        for mask in (drawn.heads, drawn.neurons):  # inside the model and the span only
            assert not mask[..., :3].any() and not mask[..., 7:].any()
        sizes.append((int(drawn.heads.sum()), int(drawn.neurons.sum())))
        hits += drawn.heads
    for count, units, got in ((24, H, [s[0] for s in sizes]), (16, I, [s[1] for s in sizes])):
        N, M = L * units * 4, (L + 1) * (units + 1) * 5
        expect = N * (1 - (1 - 1 / M) ** count)
        assert abs(sum(got) / len(got) - expect) < 0.3 + 0.05 * expect, (sum(got) / len(got), expect)
    assert hits[..., 3:7].min() > 0  # every cell of the span, the last layer, head and position included


def test_backpatch_chosen_on_the_reported_prompts(llava):
    pairs = build_pairs("sentiment", "image", llava, n=10, seed=0)
    ours = backpatch(llava, pairs, configs=default_configs(llava.n_layers), resamples=20)
    ref = backpatch(llava, pairs, configs=default_configs(llava.n_layers), resamples=20, select_on="reported")
    assert ref.n_selection == ref.n_test == ours.n_selection + ours.n_test
    best = max(ref.selection[k] for k in ref.selection if k != "base")
    assert ref.patched.value == pytest.approx(best)  # reported accuracy = the best selection accuracy: same prompts


def test_reference_study_turns_every_choice_on(llava, tmp_path):
    study = Study(llava, out=str(tmp_path), tasks=("counting",), n=8, resamples=20, all_prompts=True, reference=True)
    assert study.method == REFERENCE and study.settings["method"]["niou"] == "reference"


def test_per_component_position_effect_is_the_summed_absolute_node_score():
    """The study's per-position view: |score| of every head and neuron at a position, summed (a loop by hand)."""
    from modality_circuits.circuits.circuit import Scores

    g = torch.Generator().manual_seed(0)
    heads, neurons = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    s = Scores(heads, neurons, {"D": (0, 2), "Q": (2, 4), "G": (4, 5)}, "hand", 1)
    for absolute in (False, True):
        f = abs if absolute else (lambda v: v)
        expect = [sum(f(float(heads[l, u, t])) for l in range(2) for u in range(3))
                  + sum(f(float(neurons[l, u, t])) for l in range(2) for u in range(4)) for t in range(5)]
        torch.testing.assert_close(s.per_position(absolute=absolute), torch.tensor(expect))
    assert (s.per_position(absolute=True) > s.per_position().abs()).any()  # signed scores cancel, |·| do not


def test_unclipped_niou_by_enumeration():
    """b = E[IoU] of random subsets, by enumerating every pair of subsets; nIoU = (IoU − b) / (1 − b), clipped at 0
    by default. Disjoint sets overlap less than chance: negative unclipped, 0 clipped."""
    import itertools

    n = 6
    subsets = list(itertools.combinations(range(n), 2))
    b = sum(len(set(x) & set(y)) / len(set(x) | set(y)) for x in subsets for y in subsets) / len(subsets) ** 2
    a, c, d = (torch.zeros(n, dtype=torch.bool) for _ in range(3))
    a[:2], c[2:4], d[1:3] = True, True, True
    assert niou(a, c, "unclipped") == pytest.approx((0 - b) / (1 - b)) and niou(a, c) == 0.0  # disjoint
    assert niou(a, d, "unclipped") == pytest.approx((1 / 3 - b) / (1 - b)) == niou(a, d)  # above chance: unchanged
    assert niou(a, a, "unclipped") == pytest.approx(1.0)
