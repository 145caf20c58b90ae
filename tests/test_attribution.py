"""Attribution, exact patching and faithfulness against independent plain-torch hook implementations."""
import hooks
import pytest
import torch

from modality_circuits.circuits.circuit import Circuit, Scores
from modality_circuits.circuits.metrics import faithfulness_value
from modality_circuits.data.pairs import LayoutError, build_pairs
from modality_circuits.methods.ablation import faithfulness
from modality_circuits.methods.attribution import attribute
from modality_circuits.methods.patching import exact_patching


def _all_nodes(scores, neuron_stride=12):
    L, H, T = scores.heads.shape
    I = scores.neurons.shape[1]
    heads = [("head", l, u, t) for l in range(L) for u in range(H) for t in range(T)]
    neurons = [("neuron", l, u, t) for l in range(L) for u in range(0, I, neuron_stride) for t in range(T)]
    flat = torch.cat([scores.heads.flatten(), scores.neurons[:, ::neuron_stride].flatten()])
    return heads + neurons, flat


@pytest.mark.parametrize("modality", ["text", "image"])
def test_ig_equals_step_at_a_time_hooks(tiny, modality):
    """Batched IG through nnsight == IG computed one step at a time with torch hooks (same k)."""
    pair = build_pairs("counting", modality, tiny, n=1, seed=2)[0]
    scores = attribute(tiny, [pair], steps=3, progress=False)
    heads, neurons = hooks.ig_scores(tiny, pair, 3)
    torch.testing.assert_close(scores.heads, heads, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scores.neurons, neurons, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_exact_patching_equals_hooks_and_ig_tracks_it(tiny, modality):
    pairs = build_pairs("arithmetic", modality, tiny, n=2, seed=0)
    ig = attribute(tiny, pairs, steps=16, progress=False)
    nodes, flat = _all_nodes(ig)
    exact = exact_patching(tiny, pairs, nodes)
    for i in range(0, len(nodes), 41):  # independent check on a spread of nodes
        ref = sum(hooks.patch_node(tiny, p, *nodes[i]) for p in pairs) / len(pairs)
        assert exact[i].item() == pytest.approx(ref, abs=1e-5)
    r = torch.corrcoef(torch.stack([flat, exact]))[0, 1].item()
    print(f"{tiny.name} {modality}: Pearson r(IG k=16, exact patching) = {r:.3f} over {len(nodes)} nodes")
    assert r > 0.8  # a wrong sign gives r < 0; a wrong position decorrelates


def test_k1_is_first_order_product(tiny):
    """steps=1: score = (a(p') − a(p)) · ∂LD/∂a at p, computed by hand with hooks."""
    pair = build_pairs("color_ordering", "image", tiny, n=1, seed=4)[0]
    scores = attribute(tiny, [pair], steps=1, progress=False)
    # p' activations with p's routing in sparse layers (docs/families-2026.md); the same forward in dense models
    a_p, a_cf = hooks.activations(tiny, pair.inputs), hooks.activations(tiny, pair.cf_inputs, clean=pair.inputs)
    held = []

    def keep(module, args):
        args[0].requires_grad_(True).retain_grad()
        held.append(args[0])

    mods = [m for layer in tiny.layers(tiny.hf_model) for m in (tiny.head_site(layer), tiny.neuron_site(layer))]
    routing = hooks.held_routing(tiny, pair.inputs)  # sparse layers: p's routing as constants (no router gradient)
    handles = [m.register_forward_pre_hook(fn) for m, fn in routing + [(m, keep) for m in mods]]
    logits = tiny.hf_model(**pair.inputs).logits[0, -1]
    (logits[pair.answer_id] - logits[pair.cf_answer_id]).backward()
    for h in handles:
        h.remove()
    for i in range(tiny.n_layers):
        H, I = tiny.layer_heads[i], tiny.layer_neurons[i]  # Scores pad narrower layers with zeros
        by_hand = ((a_cf[i][1] - a_p[i][1]) * held[2 * i + 1].grad.view(a_p[i][1].shape))[0].T
        torch.testing.assert_close(scores.neurons[i, :I], by_hand, atol=1e-6, rtol=1e-4)
        dh = ((a_cf[i][0] - a_p[i][0]) * held[2 * i].grad)[0]
        torch.testing.assert_close(scores.heads[i, :H], dh.view(dh.shape[0], H, -1).sum(-1).T, atol=1e-6, rtol=1e-4)
        assert not scores.heads[i, H:].any() and not scores.neurons[i, I:].any()


def test_scores_stream_over_chunks(llava):
    """Chunking the pairs does not change the mean scores."""
    pairs = build_pairs("counting", "text", llava, n=5, seed=0)
    one = attribute(llava, pairs, steps=2, max_rows=100, progress=False)
    many = attribute(llava, pairs, steps=2, max_rows=3, progress=False)
    torch.testing.assert_close(one.heads, many.heads)
    torch.testing.assert_close(one.neurons, many.neurons)


def test_faithfulness_full_empty_and_hooks(tiny):
    pairs = build_pairs("sentiment", "image", tiny, n=3, seed=0)
    scores = attribute(tiny, pairs, steps=2, progress=False)
    full, empty = Circuit.full(scores, True), Circuit.full(scores, False)
    # exact up to float32 rounding between batch rows (the same patching code path computes all three)
    assert faithfulness(tiny, full, pairs).value == pytest.approx(1.0, abs=1e-4)
    assert faithfulness(tiny, empty, pairs).value == pytest.approx(0.0, abs=1e-4)
    circuit = Circuit.from_scores(scores, fraction=0.2)
    result = faithfulness(tiny, circuit, pairs)
    ref_c = torch.tensor([hooks.ablate(tiny, p, circuit) for p in pairs])
    ref_full = torch.tensor([hooks.ablate(tiny, p, full) for p in pairs])
    ref_empty = torch.tensor([hooks.ablate(tiny, p, empty) for p in pairs])
    torch.testing.assert_close(result.ld_circuit, ref_c, atol=1e-5, rtol=1e-4)
    assert result.value == pytest.approx(faithfulness_value(ref_c, ref_full, ref_empty), abs=1e-4)
    per_pair = faithfulness(tiny, circuit, pairs, aggregation="mean_of_ratios").value
    assert per_pair == pytest.approx(((ref_c - ref_empty) / (ref_full - ref_empty)).mean().item(), abs=1e-3)


def test_circuit_by_fraction_count_and_sets(llava):
    pairs = build_pairs("counting", "image", llava, n=2)
    scores = attribute(llava, pairs, steps=1, progress=False)
    L, H, T = scores.heads.shape
    I = scores.neurons.shape[1]
    c = Circuit.from_scores(scores, fraction=0.1)
    assert c.n_heads == int(0.1 * L * H * T) and c.n_neurons == int(0.1 * L * I * T)
    # the kept heads are the top ones by |score|
    assert scores.heads.abs()[c.heads].min() >= scores.heads.abs()[~c.heads].max()
    small = Circuit.from_scores(scores, count=3)
    assert small.n_heads == 3 and small.n_neurons == 3
    assert (small & c) == small and (small | c) == c and (small - c).n_heads == 0
    q = c.restrict("Q")
    q0, q1 = c.spans["Q"]
    assert q.heads[..., :q0].sum() == 0 and q.heads[..., q1:].sum() == 0
    assert q.heads[..., q0:q1].sum() == c.heads[..., q0:q1].sum()


def test_save_load_roundtrip_and_refusals(tmp_path, llava):
    pairs = build_pairs("counting", "text", llava, n=2)
    scores = attribute(llava, pairs, steps=1, progress=False)
    scores.save(tmp_path / "s.safetensors")
    again = Scores.load(tmp_path / "s.safetensors")
    torch.testing.assert_close(again.heads, scores.heads)
    assert again.spans == scores.spans
    c = Circuit.from_scores(scores, fraction=0.3)
    c.save(tmp_path / "c.safetensors")
    assert Circuit.load(tmp_path / "c.safetensors", model=llava.name) == c
    with pytest.raises(ValueError, match="not 'other-model'"):
        Circuit.load(tmp_path / "c.safetensors", model="other-model")
    with pytest.raises(ValueError, match="holds scores"):
        Circuit.load(tmp_path / "s.safetensors")
    foreign = Circuit(c.heads, c.neurons, c.spans, "other-model")
    with pytest.raises(ValueError, match="found on"):
        faithfulness(llava, foreign, pairs)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_fraction_outside_unit_interval(llava, fraction):
    pairs = build_pairs("counting", "text", llava, n=1)
    scores = attribute(llava, pairs, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Circuit.from_scores(scores, fraction=fraction)


def test_pairs_of_different_length_are_refused(llava):
    text = build_pairs("counting", "text", llava, n=1)
    image = build_pairs("counting", "image", llava, n=1)
    with pytest.raises(LayoutError, match="pair 1"):
        attribute(llava, text + image, steps=1, progress=False)


def test_faithfulness_curve_metrics(llava):
    from modality_circuits.methods.ablation import faithfulness_curve

    pairs = build_pairs("arithmetic", "text", llava, n=3, seed=1)
    scores = attribute(llava, pairs, steps=2, progress=False)
    curve = faithfulness_curve(llava, scores, pairs, fractions=[0.05, 0.2, 0.5, 1.0])
    assert curve.values[-1] == pytest.approx(1.0, abs=1e-4)
    for f, v in zip(curve.fractions, curve.values):
        one = faithfulness(llava, Circuit.from_scores(scores, fraction=f), pairs).value
        assert v == pytest.approx(one, abs=1e-4)
    x = [0.0, 0.05, 0.2, 0.5, 1.0]
    y = [0.0, *curve.values]
    area = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(4))
    gap = sum((x[i + 1] - x[i]) * (abs(1 - y[i]) + abs(1 - y[i + 1])) / 2 for i in range(4))
    assert curve.cpr == pytest.approx(area, abs=1e-6)
    assert curve.cmd == pytest.approx(gap, abs=1e-6)
    faithful = [f for f, v in zip(curve.fractions, curve.values) if v >= 0.8]
    assert curve.minimal_fraction == (faithful[0] if faithful else None)


def test_position_effect_exact_matches_hooks(llava):
    from modality_circuits.methods.ablation import position_effect

    pairs = build_pairs("counting", "image", llava, n=2, seed=0)
    effect = position_effect(llava, pairs)
    T = pairs[0].length
    t = pairs[0].spans["Q"][0]
    ones = Circuit(torch.ones(llava.n_layers, llava.n_heads, T, dtype=torch.bool),
                   torch.ones(llava.n_layers, llava.d_mlp, T, dtype=torch.bool), pairs[0].spans, llava.name)
    probe = Circuit.full(ones)
    probe.heads[..., t] = False
    probe.neurons[..., t] = False
    ref = sum(hooks.ablate(llava, p, probe) - hooks.ablate(llava, p, ones) for p in pairs) / len(pairs)
    assert effect.per_position[t].item() == pytest.approx(ref, abs=1e-5)
    d0, d1 = pairs[0].spans["D"]
    assert effect.per_span["D"] == pytest.approx(effect.per_position[d0:d1].mean().item())
    attributed = position_effect(llava, pairs, scores=attribute(llava, pairs, steps=8, progress=False))
    r = torch.corrcoef(torch.stack([attributed.per_position, effect.per_position]))[0, 1]
    assert r > 0.8
