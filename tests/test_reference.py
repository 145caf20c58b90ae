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


def test_reference_random_draw_includes_the_upper_bound_and_repeats(llava):
    pairs = build_pairs("counting", "text", llava, n=1, seed=0)
    L, H, I, T = llava.n_layers, llava.n_heads, llava.d_mlp, pairs[0].length
    sub = Circuit(torch.zeros(L, H, T, dtype=torch.bool), torch.zeros(L, I, T, dtype=torch.bool), pairs[0].spans,
                  llava.name)
    start, end = pairs[0].spans["Q"]
    sub.heads[:, :, start:end] = True  # every head of the span: a uniform draw of that size is the whole span
    uniform = random_like(sub, "Q", torch.Generator().manual_seed(0))
    assert uniform.heads.sum() == sub.heads.sum()
    g = torch.Generator().manual_seed(0)
    drawn = random_like(sub, "Q", g, draw="reference")
    g = torch.Generator().manual_seed(0)  # by hand: the same randint draws, bounds included
    n = int(sub.heads.sum())
    li, ui, ti = (torch.randint(0, k + 1, (n,), generator=g) for k in (L, H, end - start))
    expect = torch.zeros_like(sub.heads)
    keep = (li < L) & (ui < H) & (ti < end - start)
    expect[li[keep], ui[keep], start + ti[keep]] = True
    assert torch.equal(drawn.heads, expect) and drawn.heads.sum() < n  # out-of-range draws and repeats are lost


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
