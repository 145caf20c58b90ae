"""The 2026 families' node kinds (docs/families-2026.md): linear-attention heads and MoE expert neurons, checked
against the model's own weights with plain torch, and the refusals of what the package cannot define."""
import dataclasses

import pytest
import torch
import transformers as T
from conftest import get_tiny

from modality_circuits.data.pairs import build_pairs


def _logits(model, inputs, hooks=()):
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            return model.hf_model(**inputs).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


def test_linear_attention_head_is_the_slice_that_reads_its_value_head():
    """Zero value head h's rows of in_proj_qkv: exactly the head-h slice of out_proj's input vanishes, the others
    stay as they were (a wrong head width or order would move other slices)."""
    model = get_tiny("qwen3_5")
    tc = model.text_config
    pair = build_pairs("counting", "image", model, n=1)[0]
    layer = model.layers(model.hf_model)[0]
    assert tc.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"] and hasattr(layer, "linear_attn")
    H, d = model.layer_heads[0], model.layer_head_dims[0]
    assert (H, d) == (tc.linear_num_value_heads, tc.linear_value_head_dim) and model.n_heads == H
    site, proj = model.head_site(layer), layer.linear_attn.in_proj_qkv
    assert site is layer.linear_attn.out_proj
    v0 = 2 * tc.linear_num_key_heads * tc.linear_key_head_dim  # q, k, then the value heads
    seen = []
    handle = site.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        _logits(model, pair.inputs)
        for h in range(H):
            saved = proj.weight.data.clone()
            proj.weight.data[v0 + h * d: v0 + (h + 1) * d] = 0
            _logits(model, pair.inputs)
            proj.weight.data.copy_(saved)
    finally:
        handle.remove()
    clean = seen[0].view(*seen[0].shape[:2], H, d)
    assert clean.abs().amin(dim=(0, 1, 3)).min() == 0 or clean.abs().sum(dim=(0, 1, 3)).min() > 0  # every head speaks
    for h, out in enumerate(seen[1:]):
        out = out.view_as(clean)
        assert not out[:, :, h].any(), h
        others = [g for g in range(H) if g != h]
        torch.testing.assert_close(out[:, :, others], clean[:, :, others], atol=0, rtol=0)


def test_full_attention_layer_of_qwen3_5_keeps_its_own_head_count():
    """Full-attention layers have fewer heads than the linear ones: their Scores rows beyond them are padding."""
    model = get_tiny("qwen3_5")
    tc = model.text_config
    assert model.layer_heads == (6, 6, 6, 4) and model.layer_head_dims == (4, 4, 4, 8)
    full = model.layers(model.hf_model)[3]
    assert model.head_site(full) is full.self_attn.o_proj
    assert full.self_attn.o_proj.in_features == tc.num_attention_heads * tc.head_dim


def test_sited_experts_compute_what_transformers_experts_compute():
    """The experts' forward with a neuron site (model/experts.py) equals transformers' own (eager) experts."""
    model = get_tiny("qwen3_vl_moe")
    experts = model.experts_of(model.layers(model.hf_model)[1])
    torch.manual_seed(0)
    hidden = torch.randn(7, model.text_config.hidden_size)
    top = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    ours = experts(hidden, top, weights)
    theirs = type(experts).forward(experts, hidden, top, weights)  # the class's dispatch, no site
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert experts.config._experts_implementation in (None, "eager", "grouped_mm", "batched_mm")


def _always_on(family, layer):
    """The MLP whose neurons follow the routed experts' in the site: GLM's shared expert, Gemma 4's dense MLP."""
    return {"glm46v": getattr(layer.mlp, "shared_experts", None), "gemma4": layer.mlp}.get(family)


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm46v", "gemma4"])
def test_expert_nodes_are_that_experts_neurons(family):
    """Zeroing all nodes of expert e (units e·I .. (e+1)·I of the site, every position) through the package's site
    equals zeroing down_proj[e] in plain torch (GLM's shared expert, Gemma 4's dense MLP: the units after E·I, its
    down_proj); and a neuron is zero where its token is not routed to e."""
    model = get_tiny(family)
    pair = build_pairs("counting", "image", model, n=1)[0]
    layers, i = model.layers(), 1  # a sparse layer below the last: its nodes reach every later position
    layer = model.layers(model.hf_model)[i]
    experts = model.experts_of(layer)
    E, I = experts.num_experts, experts.down_proj.shape[-1]
    always = _always_on(family, layer)
    assert model.layer_neurons[i] == E * I + (always.down_proj.in_features if always is not None else 0) and E >= 4
    tc = model.text_config
    assert getattr(tc, "num_experts_per_tok", None) or tc.top_k_experts == 2
    weights = [(experts.down_proj, e, slice(e * I, (e + 1) * I)) for e in range(E)]
    if always is not None:
        weights.append((always.down_proj.weight, slice(None), slice(E * I, None)))
    for param, index, units in weights:
        with model.trace(pair.inputs):
            site = model.neuron_site(layers[i])
            acts = site.input.clone().save()
            zeroed = site.input.clone()
            zeroed[:, units] = 0
            site.input = zeroed
            logits = model.nn.output.logits.save()  # every position
        saved = param.data[index].clone()
        param.data[index] = 0
        try:
            with torch.no_grad():
                by_weights = model.hf_model(**pair.inputs).logits
        finally:
            param.data[index] = saved
        torch.testing.assert_close(logits, by_weights, atol=1e-6, rtol=1e-5)
    routed = []
    handle = experts.register_forward_pre_hook(lambda m, args: routed.append(args[1]))
    _logits(model, pair.inputs)
    handle.remove()
    assert len(routed[0].unique()) >= 3  # most experts are in use (an expert routed nowhere has only zeros)
    for e in routed[0].unique().tolist():
        off = ~(routed[0] == e).any(-1)  # tokens not routed to e
        assert not acts[:, :E * I].view(-1, E, I)[off, e].any()
        assert acts[:, :E * I].view(-1, E, I)[~off, e].abs().sum() > 0
    if always is not None:  # the shared expert and the dense MLP see every token
        assert (acts[:, E * I:].abs().sum(-1) > 0).all()


def test_unknown_layer_types_are_refused_by_name():
    """A decoder whose layer types the package does not know: refused naming the type, before a model is wrapped."""
    from modality_circuits.model import wrap
    from modality_circuits.model.adapters import ADAPTERS, layer_heads

    tc = T.Qwen3_5TextConfig(num_hidden_layers=2)
    tc.layer_types = ["linear_attention", "mamba"]
    with pytest.raises(ValueError, match=r"unknown decoder layer type\(s\) 'mamba'.*full_attention, linear_attention"):
        layer_heads(ADAPTERS["qwen3_5"], tc)
    from modality_circuits.testing import tiny_model

    fresh = tiny_model("qwen3_vl")  # not the shared cached model: its config is changed here
    fresh.text_config.layer_types = ["full_attention", "linear_attention", "full_attention"]  # not a Qwen3-VL kind
    with pytest.raises(ValueError, match=r"qwen3_vl: unknown decoder layer type\(s\) 'linear_attention'"):
        wrap(fresh.hf_model, fresh.processor, name="x")


def test_moe_refuses_free_routing_and_hosting_before_any_work(tmp_path):
    from modality_circuits.study.steps import Study

    moe, kw = get_tiny("qwen3_vl_moe"), dict(out=str(tmp_path), tasks=("counting",), n=4, resamples=10)
    for reference in (False, True):
        with pytest.raises(ValueError, match=r"mixture-of-experts model \(3 sparse layers\).*routing='held'"):
            Study(moe, **kw, reference=reference, routing="free")
    with pytest.raises(ValueError, match="routing must be 'held' or 'free'"):
        Study(moe, **kw, routing="clean")
    assert Study(moe, **kw, reference=True).routing == "held"
    Study(get_tiny("llava"), **kw, routing="free")  # a dense model has no routing to hold
    with pytest.raises(ValueError, match="hosted mixture-of-experts model has no expert-neuron site"):
        dataclasses.replace(moe, remote="http://localhost:1")


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm46v", "gemma4"])
def test_sited_model_computes_what_the_unsited_model_computes(family):
    """The whole model with neuron sites (sited experts, GLM's sited block, Gemma 4's sparse layer run by its dense
    MLP's sited forward) against an untouched copy, text and image prompts."""
    import copy

    from modality_circuits.model import wrap
    from modality_circuits.zoo.tiny import TINY

    torch.manual_seed(0)
    model, processor = TINY[family].build(TINY[family].template.tokenizer())
    plain = copy.deepcopy(model).eval()
    sited = wrap(model, processor, name="x", image_size=64, wording="toy")
    for modality in ("text", "image"):
        pair = build_pairs("counting", modality, sited, n=1)[0]
        with torch.no_grad():
            torch.testing.assert_close(sited.hf_model(**pair.inputs).logits, plain(**pair.inputs).logits,
                                       atol=1e-6, rtol=1e-5)


def test_gemma4_head_widths_come_from_each_layers_config():
    """Gemma 4's full-attention layers have wider heads (the per-layer config's head_dim) than its sliding ones; a
    sliding head's slice is the one that reads its key-value head: zero that KV head's v_proj rows and exactly the
    slices of the heads of its group vanish."""
    model = get_tiny("gemma4")
    tc, layers = model.text_config, model.layers(model.hf_model)
    assert tc.layer_types == ["sliding_attention", "full_attention"] * 2
    assert model.layer_head_dims == (8, 16, 8, 16) and model.layer_heads == (4, 4, 4, 4)
    for layer, d in zip(layers, model.layer_head_dims):
        assert model.head_site(layer).in_features == tc.num_attention_heads * d
    pair = build_pairs("counting", "image", model, n=1)[0]
    attn, H, d = layers[0].self_attn, model.layer_heads[0], model.layer_head_dims[0]
    group = H // (attn.v_proj.out_features // d)  # heads per KV head
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        _logits(model, pair.inputs)
        saved = attn.v_proj.weight.data.clone()
        attn.v_proj.weight.data[:d] = 0  # KV head 0
        try:
            _logits(model, pair.inputs)
        finally:
            attn.v_proj.weight.data.copy_(saved)
    finally:
        handle.remove()
    clean, zeroed = (s.view(*s.shape[:2], H, d) for s in seen)
    assert not zeroed[:, :, :group].any() and clean[:, :, :group].abs().sum() > 0
    torch.testing.assert_close(zeroed[:, :, group:], clean[:, :, group:], atol=0, rtol=0)


def test_gemma4_token_input_differs_between_the_prompts_and_is_each_rows_own():
    """The per-layer token embeddings (the stack's `per_layer_inputs`) of a text pair differ between p and p' at the
    data positions (an image pair's are the same: image tokens look up the pad token, and the image reaches the
    per-layer inputs through inputs_embeds). A forward that starts from the merged input and hands the stack p's e
    and q gives the logits of a plain forward of p; without them (the stack computing the per-layer inputs from the
    image-less row) it does not."""
    from modality_circuits.execution.bodies import decoder_inputs, feed_stack

    model = get_tiny("gemma4")
    layers, stack, key = model.layers(), model.decoder_stack(), model.adapter.token_inputs
    assert key == "per_layer_inputs"

    def read(inputs):
        with model.trace(inputs) as tracer:
            e, _, q = decoder_inputs(layers, stack, (), False, token_key=key)
            e, q = e.save(), q.save()
            tracer.stop()
        return e, q

    for modality in ("text", "image"):
        pair = build_pairs("counting", modality, model, n=1)[0]
        (e, q), (_, q_cf) = read(pair.inputs), read(pair.cf_inputs)
        d0, d1 = pair.spans["D"]
        assert q.shape[:3] == (1, pair.length, model.n_layers)
        assert ((q[:, d0:d1] - q_cf[:, d0:d1]).abs().amax() > 0) == (modality == "text")
    out = {}
    for fed in (True, False):
        with model.trace(model.decoder_inputs(pair.inputs)):  # the image pair, without the vision inputs
            if fed:
                feed_stack(stack, e, key, q)
            layers[0].input = e
            out[fed] = model.nn.output.logits[0, -1].save()
    torch.testing.assert_close(out[True], _logits(model, pair.inputs), atol=1e-5, rtol=1e-5)
    assert (out[False] - out[True]).abs().max() > 1e-4


def test_gemma4_dense_variant_uses_the_mlp_site():
    """Gemma 4's dense text variant (E2B, E4B: no experts) has `mlp.down_proj` as neuron site, double-wide on the
    KV-shared layers, and is not refused for a server as the MoE variant is; IG through nnsight equals
    step-at-a-time hooks and F(full) = 1, F(empty) = 0 on it."""
    import hooks

    from modality_circuits.circuits.circuit import Circuit
    from modality_circuits.methods.ablation import faithfulness
    from modality_circuits.methods.attribution import attribute
    from modality_circuits.model import wrap

    tiny = get_tiny("gemma4")
    config = tiny.hf_model.config.__class__.from_dict(tiny.hf_model.config.to_dict())
    config.text_config.enable_moe_block = False
    torch.manual_seed(0)
    hf = T.Gemma4ForConditionalGeneration(config)
    for layer in hf.model.language_model.layers:  # the tiny recipe's temperature
        layer.self_attn.q_norm.weight.data.fill_(layer.self_attn.head_dim ** -0.5)
    dense = wrap(hf, tiny.processor, name="dense", image_size=64, wording="toy")
    layers = dense.layers(dense.hf_model)
    assert all(dense.experts_of(layer) is None and dense.neuron_site(layer) is layer.mlp.down_proj for layer in layers)
    assert dense.layer_neurons == (48, 48, 96, 96)
    assert dataclasses.replace(dense, remote="http://localhost:1").remote  # no sparse layer: a server may host it
    pairs = build_pairs("counting", "text", dense, n=2, seed=1)
    scores = attribute(dense, pairs[:1], steps=3, progress=False)
    heads, neurons = hooks.ig_scores(dense, pairs[0], 3)
    torch.testing.assert_close(scores.heads, heads, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scores.neurons, neurons, atol=1e-6, rtol=1e-4)
    assert faithfulness(dense, Circuit.full(scores, True), pairs).value == pytest.approx(1.0, abs=1e-4)
    assert faithfulness(dense, Circuit.full(scores, False), pairs).value == pytest.approx(0.0, abs=1e-4)
