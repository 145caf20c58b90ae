"""Overlap, interchange, alignment, back-patching and bootstrap (docs/method.md sections 5-9)."""
import dataclasses

import numpy as np
import pytest
import torch

from modality_circuits.analyses.alignment import alignment
from modality_circuits.analyses.backpatch import backpatch, backpatch_logits, default_configs
from modality_circuits.analyses.interchange import interchange, map_span
from modality_circuits.analyses.overlap import overlap
from modality_circuits.circuits.circuit import Circuit
from modality_circuits.circuits.metrics import expected_iou, iou, niou
from modality_circuits.circuits.stats import bootstrap
from modality_circuits.data.pairs import build_pairs, prompt_key, split
from modality_circuits.methods.attribution import attribute
from modality_circuits.methods.predict import predictions


def test_iou_and_niou_by_hand():
    a = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert iou(a, b) == 2 / 4
    # E[IoU] for sizes 3, 3 in 8: X ~ Hypergeom(8, 3, 3): P(X=x) = C(3,x)C(5,3-x)/C(8,3)
    from math import comb
    exp = sum(comb(3, x) * comb(5, 3 - x) / comb(8, 3) * x / (6 - x) for x in range(4))
    assert expected_iou(8, 3, 3) == pytest.approx(exp)
    assert niou(a, b) == pytest.approx((0.5 - exp) / (1 - exp))
    assert niou(a, a) == 1.0
    assert niou(a, ~a) == 0.0  # disjoint: IoU 0 < baseline, clipped at 0


def test_expected_iou_matches_monte_carlo():
    rng = np.random.default_rng(0)
    n, sa, sb = 50, 12, 20
    draws = []
    for _ in range(20000):
        a = np.zeros(n, bool)
        b = np.zeros(n, bool)
        a[rng.choice(n, sa, replace=False)] = True
        b[rng.choice(n, sb, replace=False)] = True
        draws.append((a & b).sum() / (a | b).sum())
    assert expected_iou(n, sa, sb) == pytest.approx(np.mean(draws), abs=2e-3)


def test_niou_of_random_circuits_is_zero_in_expectation_and_identical_is_one():
    gen = torch.Generator().manual_seed(0)
    raw = [(torch.rand(4, 8, 30, generator=gen) < 0.2) for _ in range(400)]
    values = [(torch.tensor(iou(a, b)) - expected_iou(a.numel(), int(a.sum()), int(b.sum()))).item()
              for a, b in zip(raw[::2], raw[1::2])]
    assert abs(np.mean(values)) < 0.005  # IoU − b is centred at 0; nIoU clips it at 0
    assert np.mean([niou(a, b) for a, b in zip(raw[::2], raw[1::2])]) < 0.05
    assert niou(raw[0], raw[0]) == 1.0


def _circuit(spans, T, seed, p=0.3, L=2, H=4, I=6):
    gen = torch.Generator().manual_seed(seed)
    return Circuit(torch.rand(L, H, T, generator=gen) < p, torch.rand(L, I, T, generator=gen) < p, spans, "m")


def test_overlap_aligns_q_g_from_span_end_and_d_without_position():
    text = _circuit({"D": (1, 6), "Q": (6, 9), "G": (9, 11)}, 11, seed=1)
    # the visual circuit: same Q/G nodes at shifted positions, D nodes at other positions of a longer span
    visual = Circuit(torch.zeros(2, 4, 20, dtype=torch.bool), torch.zeros(2, 6, 20, dtype=torch.bool),
                     {"D": (2, 14), "Q": (15, 18), "G": (18, 20)}, "m")
    visual.heads[..., 15:20] = text.heads[..., 6:11]
    visual.neurons[..., 15:20] = text.neurons[..., 6:11]
    d_units = text.heads[..., 1:6].any(-1)
    visual.heads[..., 13] = d_units  # present at one data position only
    visual.neurons[..., 2] = text.neurons[..., 1:6].any(-1)
    res = overlap(text, visual)
    for span in "DQG":
        assert res[span].iou_heads == 1.0 and res[span].niou == 1.0
    assert overlap(text, _circuit(text.spans, 11, seed=2))["Q"].niou < 1.0


def test_interchange_with_itself_scores_one(llava):
    pairs = build_pairs("counting", "image", llava, n=4, seed=0)
    c = Circuit.from_scores(attribute(llava, pairs, steps=2, progress=False), fraction=0.4)
    for span in "QG":
        assert c.restrict(span).n_heads + c.restrict(span).n_neurons > 0
        res = interchange(llava, c, c, pairs, span, n_random=3, resamples=50)
        assert res.f_swapped == res.f_original
        assert res.score == 1.0 and res.ci.value == 1.0
        assert len(res.f_random) == 3 and res.ci.low <= res.ci.high
        assert res.margin == pytest.approx(res.f_original - sum(res.f_random) / 3)
        assert res.interpretable == (res.margin >= 0.05)


def test_map_span_preserves_q_size_and_places_d_units_everywhere(llava):
    text = build_pairs("counting", "text", llava, n=2, seed=0)
    image = build_pairs("counting", "image", llava, n=2, seed=0)
    ct = Circuit.from_scores(attribute(llava, text, steps=1, progress=False), fraction=0.2)
    ci = Circuit.from_scores(attribute(llava, image, steps=1, progress=False), fraction=0.2)
    q = map_span(ct, ci, "Q")
    assert q.n_heads == ct.restrict("Q").n_heads and q.heads.shape == ci.heads.shape
    d = map_span(ct, ci, "D")
    d0, d1 = ci.spans["D"]
    units = ct.heads[..., slice(*ct.spans["D"])].any(-1)
    assert torch.equal(d.heads[..., d0:d1], units[..., None].expand(-1, -1, d1 - d0))
    assert d.heads[..., :d0].sum() == 0 and d.heads[..., d1:].sum() == 0


def test_backpatch_src_equal_dst_changes_nothing(tiny):
    pairs = build_pairs("arithmetic", "image", tiny, n=3, seed=0)
    L = tiny.n_layers
    # the mechanics: a prefix-LM family, refused by default (test_families.py), runs with the override
    logits = backpatch_logits(tiny, pairs, [(l, l, 1) for l in range(L)] + [(L - 1, 0, 1)],
                              allow_prefix_attention=tiny.adapter.attention == "prefix")
    base = predictions(tiny, pairs)
    for l in range(L):
        torch.testing.assert_close(logits[l], base)
    assert (logits[-1] - base).abs().max() > 0  # a real back-patch does change them


def test_backpatch_split_is_disjoint_and_config_from_selection(llava):
    pairs = build_pairs("sentiment", "image", llava, n=10, seed=0)
    selection, test = split(pairs, 0.5)
    assert not {prompt_key(p.prompt) for p in selection} & {prompt_key(p.prompt) for p in test}
    res = backpatch(llava, pairs, configs=default_configs(llava.n_layers), resamples=50)
    assert res.n_selection + res.n_test <= len(pairs)
    assert str(res.config) in res.selection
    assert res.gain.value == pytest.approx(100 * (res.patched.value - res.base.value))  # points


@pytest.mark.parametrize("accuracy", ["answer_set", "top1"])
@pytest.mark.parametrize("name, task", [("tiny-llava", "counting"), ("toy", "arithmetic")])
def test_backpatch_accuracies_by_hand(name, task, accuracy):
    """Test-split accuracies from plain forwards (unpatched) and a plain-torch hook writing layer src's data-position
    output into layer dst's (patched): the right answer is the argmax over the task's answers, or over the vocabulary.
    (The random tiny model answers within the answer set by chance only; the trained toy gains or loses by patching.)"""
    from conftest import get_tiny

    from modality_circuits.analyses.backpatch import answer_ids
    from modality_circuits.zoo import load_model

    model = get_tiny("model") if name == "tiny-model" else load_model(name)
    pairs = build_pairs(task, "image", model, n=16, seed=4)
    config = (model.n_layers - 1, 0, 1)
    res = backpatch(model, pairs, configs=[config], resamples=20, accuracy=accuracy)
    _, test = split(pairs, 0.5)
    answers = answer_ids(model, pairs)
    layers = model.layers(model.hf_model)

    def correct(p, patch):
        cache = {}

        def keep(module, args, output):
            cache["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        def write(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h[:, start:end] = cache["h"][:, start:end]
            return output

        start, end = p.spans["D"]
        with torch.no_grad():
            if patch:
                handle = layers[config[0]].register_forward_hook(keep)
                model.hf_model(**p.inputs)
                handle.remove()
                handle = layers[config[1]].register_forward_hook(write)
            logits = model.hf_model(**p.inputs).logits[0, -1]
            if patch:
                handle.remove()
        if accuracy == "top1":
            return int(logits.argmax()) == p.answer_id
        return int(answers[logits[answers].argmax()]) == p.answer_id

    base, patched = (np.mean([correct(p, patch) for p in test]) for patch in (False, True))
    assert res.accuracy == accuracy and res.n_test == len(test)
    assert res.base.value == pytest.approx(base) and res.patched.value == pytest.approx(patched)
    if name == "toy":
        assert base > 0.5 and patched != base


def test_split_drops_repeated_prompts(llava):
    pairs = build_pairs("counting", "text", llava, n=4, seed=0)
    a, b = split(pairs + pairs, 0.5)
    assert len(a) + len(b) == 4


def test_alignment_per_layer(llava):
    image = build_pairs("color_ordering", "image", llava, n=4, seed=2)
    text = build_pairs("color_ordering", "text", llava, n=4, seed=2)
    res = alignment(llava, image, text, resamples=50)
    assert res.per_layer.shape == (llava.n_layers,)
    assert ((res.per_layer > -1) & (res.per_layer <= 1)).all()
    # same content on both sides: aligning a modality with itself gives similarity 1 (text posing as the image side,
    # since alignment refuses text prompts as image_pairs)
    posing = [dataclasses.replace(p, prompt=dataclasses.replace(p.prompt, modality="image")) for p in text]
    self_sim = alignment(llava, posing, text, resamples=10)
    torch.testing.assert_close(self_sim.per_layer, torch.ones(llava.n_layers), atol=1e-5, rtol=0)


def _residuals(model, inputs) -> torch.Tensor:
    """(L, T, d) float32 output of every decoder layer for one prompt, by plain forward hooks."""
    outs = []

    def grab(module, args, output):
        outs.append((output[0] if isinstance(output, tuple) else output)[0].detach().float())

    handles = [layer.register_forward_hook(grab) for layer in model.layers(model.hf_model)]
    try:
        with torch.no_grad():
            model.hf_model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs)


@pytest.mark.parametrize("family", ["llava", "pixtral"])  # pixtral: [IMG_BREAK]/[IMG_END] markers inside D
def test_alignment_options_match_plain_hooks(family):
    """Mean over image positions of the max cosine over text positions, per layer, from plain hooks: D vs image
    tokens only on the visual side, D vs every token on the textual side."""
    from conftest import get_tiny

    model = get_tiny(family)
    image = build_pairs("counting", "image", model, n=3, seed=1)
    text = build_pairs("counting", "text", model, n=3, seed=1)
    values = {}
    for image_tokens in ("span", "image"):
        for text_tokens in ("data", "all"):
            expect = []
            for p_img, p_txt in zip(image, text):
                (i0, i1), (t0, t1) = p_img.spans["D"], p_txt.spans["D"]
                pos = torch.arange(i0, i1)
                if image_tokens == "image":
                    ids = p_img.inputs["input_ids"][0, i0:i1]
                    pos = pos[ids == model.hf_model.config.image_token_id]  # the image token, not the markers
                tpos = torch.arange(t0, t1) if text_tokens == "data" else torch.arange(p_txt.length)
                h = torch.nn.functional.normalize(_residuals(model, p_img.inputs)[:, pos], dim=-1)
                g = torch.nn.functional.normalize(_residuals(model, p_txt.inputs)[:, tpos], dim=-1)
                expect.append((h @ g.transpose(-1, -2)).max(-1).values.mean(-1))  # (L,)
            got = alignment(model, image, text, resamples=10, text_tokens=text_tokens, image_tokens=image_tokens)
            torch.testing.assert_close(got.per_layer, torch.stack(expect).mean(0), atol=1e-5, rtol=1e-4)
            values[image_tokens, text_tokens] = got.per_layer
    assert (values["span", "all"] - values["span", "data"]).abs().max() > 1e-3  # the options change the number
    if family == "pixtral":
        assert (values["image", "data"] - values["span", "data"]).abs().max() > 1e-4


def test_bootstrap_interval():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    ci = bootstrap(lambda i: x[i].mean(), len(x), resamples=500)
    assert ci.low < ci.value < ci.high
    assert ci.value == pytest.approx(x.mean())
    assert ci.high - ci.low == pytest.approx(2 * 1.96 / 20, rel=0.25)
