"""What makes real sizes affordable changes no number: last-position logits, the memory budget's chunking,
decoder inputs computed once per prompt, skipped layers in back-patching, float32 metrics of bf16 models."""
import contextlib
import dataclasses

import pytest
import torch
from hooks import ablate, batched, ig_scores

from modality_circuits.analyses.alignment import alignment
from modality_circuits.analyses.backpatch import backpatch_logits
from modality_circuits.circuits.circuit import Circuit
from modality_circuits.data.pairs import build_pairs
from modality_circuits.execution import budget
from modality_circuits.methods.ablation import ablation_lds, logit_diffs, position_effect
from modality_circuits.methods.attribution import attribute
from modality_circuits.methods.patching import exact_patching
from modality_circuits.testing import tiny_model


def _random_circuit(model, pairs, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    T = pairs[0].length
    return Circuit(torch.rand(model.n_layers, model.n_heads, T, generator=g) < p,
                   torch.rand(model.n_layers, model.d_mlp, T, generator=g) < p, pairs[0].spans, model.name)


def test_budget_parsing_and_rows(llava):
    assert budget.parse("auto") == "auto" and budget.parse(None) == "auto"
    assert budget.parse("1.5GB") == int(1.5 * 2**30) and budget.parse("512 MB") == 512 * 2**20 and budget.parse(4096) == 4096
    for bad in ("lots", -1, "0GB", True):
        with pytest.raises(ValueError, match="memory budget"):
            budget.parse(bad)
    small = dataclasses.replace(llava, memory_budget=1)
    assert budget.rows(small, 20, max_rows=64) == 1
    one_row = budget.row_bytes(llava, 20, backward=True)
    assert budget.rows(dataclasses.replace(llava, memory_budget=10 * one_row + 1), 20, backward=True) == 10
    assert budget.rows(dataclasses.replace(llava, memory_budget="1TB"), 20, max_rows=64) == 64


def test_budget_counts_linear_attention_layers():
    """Qwen3.5's Gated DeltaNet layers add float32 tensors of the sequence padded to the chunk (64) times the value
    heads' width: 18 live in a forward, 16 kept per linear layer for a backward (docs/families-2026.md); a model
    without linear layers is unchanged (llava above)."""
    from conftest import get_tiny

    model = get_tiny("qwen3_5")
    tc = model.text_config
    n_linear = tc.layer_types.count("linear_attention")
    width = tc.linear_num_value_heads * tc.linear_value_head_dim
    for T, padded in ((20, 64), (64, 64), (65, 128)):
        tensor = padded * width * 4
        b, d, i, h = 4, tc.hidden_size, model.d_mlp, model.n_heads  # float32 tiny model
        dense = T * (8 * d + 10 * i) * b + 2 * h * T * T * b + 4 * tc.vocab_size
        assert budget.row_bytes(model, T) == dense + 18 * tensor
        assert budget.row_bytes(model, T, backward=True) == (model.n_layers * (T * (18 * d + 12 * i) * b + h * T * T * b)
                                                              + n_linear * 16 * tensor + dense + 18 * tensor)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_a_tight_budget_splits_every_step_and_changes_no_number(tiny, modality):
    """One row per forward (budget of 1 byte) gives the numbers of one big forward."""
    pairs = build_pairs("counting", modality, tiny, n=3, seed=1)
    image = build_pairs("counting", "image", tiny, n=3, seed=1)
    text = build_pairs("counting", "text", tiny, n=3, seed=1)
    tight = dataclasses.replace(tiny, memory_budget=1)
    circuits = [_random_circuit(tiny, pairs, s) for s in range(3)]
    nodes = [("head", 0, 1, 2), ("neuron", 1, 3, pairs[0].length - 1), ("head", 1, 0, 0)]
    configs = [(1, 0, 1), (1, 1, 1), (0, 0, 2)]
    for m in (tiny, tight):
        got = (attribute(m, pairs, steps=2, progress=False).heads, ablation_lds(m, circuits, pairs),
               exact_patching(m, pairs, nodes), position_effect(m, pairs).per_position, logit_diffs(m, pairs),
               backpatch_logits(m, pairs, configs, allow_prefix_attention=m.adapter.attention == "prefix"),
               alignment(m, image, text, resamples=5).per_layer)
        if m is tiny:
            wide = got
    for a, b in zip(wide, got):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@contextlib.contextmanager
def _rows_through(module):
    """Counts the rows (images) each call of `module` processes."""
    rows = []
    handle = module.register_forward_hook(lambda m, args, out: rows.append(len(args[0]) if args else 0))
    try:
        yield rows
    finally:
        handle.remove()


def test_vision_tower_runs_once_per_prompt_and_ablation_matches_hooks(llava):
    """Ablation forwards start from decoder inputs computed once: the tower sees each image once per request."""
    pairs = build_pairs("counting", "image", llava, n=3, seed=0)
    circuits = [_random_circuit(llava, pairs, s) for s in range(4)]
    with _rows_through(llava.hf_model.model.vision_tower) as rows:
        lds = ablation_lds(llava, circuits, pairs)
    assert sum(rows) == 2 * len(pairs)  # p and p' of each pair, once (the old path: (1 + circuits) x pairs x 2)
    for c, circuit in enumerate(circuits):
        for i, pair in enumerate(pairs):
            assert lds[c, i].item() == pytest.approx(ablate(llava, pair, circuit), abs=1e-5)


def test_position_effect_on_chosen_positions_equals_the_full_one(llava):
    pairs = build_pairs("counting", "text", llava, n=2, seed=0)
    full = position_effect(llava, pairs)
    chosen = [0, 3, pairs[0].length - 1]
    part = position_effect(llava, pairs, positions=chosen)
    torch.testing.assert_close(part.per_position[chosen], full.per_position[chosen], atol=1e-6, rtol=0)
    assert part.per_position[[1, 2]].isnan().all() and set(part.per_span) <= set(full.per_span)


def _hook_backpatch(model, pair, config) -> torch.Tensor:
    """Last-position logits with layer dst+i outputting, at D, the cached output of src+i (plain forward hooks)."""
    src, dst, w = config
    layers = model.layers(model.hf_model)
    start, end = pair.spans["D"]
    cache = {}

    def keep(i):
        return lambda mod, args, out: cache.__setitem__(i, out[:, start:end].clone())

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model.hf_model(**pair.inputs)
    for h in handles:
        h.remove()

    def write(s):
        def hook(mod, args, out):
            out = out.clone()
            out[:, start:end] = cache[s]
            return out
        return hook

    handles = [layers[dst + i].register_forward_hook(write(src + i)) for i in range(w)]
    with torch.no_grad():
        logits = model.hf_model(**pair.inputs).logits[0, -1]
    for h in handles:
        h.remove()
    return logits


def test_backpatch_with_skipped_layers_matches_hooks():
    """On the 4-layer toy, configs with dst > 0 skip the layers below dst; the logits are those of plain hooks."""
    from modality_circuits.zoo import load_model

    toy = load_model("toy")
    pairs = build_pairs("counting", "image", toy, n=3, seed=0)
    configs = [(3, 1, 1), (2, 0, 2), (3, 2, 1), (2, 1, 2), (1, 1, 1)]
    logits = backpatch_logits(toy, pairs, configs)
    for c, config in enumerate(configs):
        for i, pair in enumerate(pairs):
            torch.testing.assert_close(logits[c, i], _hook_backpatch(toy, pair, config), atol=1e-4, rtol=1e-4)


def test_bf16_model_metrics_are_float32_and_match_a_float64_recomputation():
    """With a bf16 model, LDs, F and IG scores come back in float32 and agree with float64 arithmetic on the same
    activations (the model's own bf16 rounding aside)."""
    model = tiny_model("llava")
    model.hf_model.to(torch.bfloat16)
    pairs = build_pairs("counting", "text", model, n=3, seed=0)
    lds = logit_diffs(model, pairs)
    assert lds.dtype == torch.float32
    with torch.no_grad():
        logits = model.hf_model(**batched(pairs)).logits[:, -1].double()
    expect = logits[torch.arange(3), [p.answer_id for p in pairs]] - logits[torch.arange(3), [p.cf_answer_id for p in pairs]]
    torch.testing.assert_close(lds.double(), expect, atol=1e-6, rtol=0)  # exact: a bf16 logit is a float32 number
    circuit = _random_circuit(model, pairs, 0)
    ab = ablation_lds(model, [circuit], pairs)
    assert ab.dtype == torch.float32
    for i, pair in enumerate(pairs):  # hooks compute the LD from the same bf16 logits, in float32 here
        assert ab[0, i].item() == pytest.approx(ablate(model, pair, circuit), abs=0.05)
    scores = attribute(model, pairs[:1], steps=2, progress=False)
    assert scores.heads.dtype == torch.float32 and scores.neurons.dtype == torch.float32
    heads, neurons = ig_scores(model, pairs[0], 2)  # bf16 throughout: agreement to bf16 precision
    corr = torch.corrcoef(torch.stack([scores.neurons.flatten(), neurons.float().flatten()]))[0, 1]
    assert corr > 0.99, f"r = {corr:.4f}"


def test_certified_candidates_give_the_full_tensor_niou_interval(tmp_path, capsys):
    """On the toy, the nIoU interval from per-pair scores kept only for a certified candidate set (as at real
    scale) equals the interval from every pair's full score tensor."""
    import json

    from modality_circuits.study.steps import Study, run_overlap
    from modality_circuits.zoo import load_model

    toy = load_model("toy")
    settings = dict(out=str(tmp_path), tasks=("counting",), n=12, resamples=200)
    full = run_overlap(Study(toy, **settings), "counting")
    (tmp_path / "toy" / "counting" / "overlap.json").unlink()
    for cache in (tmp_path / "toy" / ".cache").glob("*"):
        cache.unlink()
    large = Study(toy, max_per_pair_bytes=0, **settings)  # as if every pair's scores were too large to keep
    capsys.readouterr()
    kept = run_overlap(large, "counting")
    log = capsys.readouterr().out
    assert log.count("200/200 resamples certified") == 2, log  # the candidate path ran, for both modalities
    assert "note" not in kept
    kept.pop("time"), full.pop("time")  # each run's own
    assert json.dumps(kept, sort_keys=True) == json.dumps(full, sort_keys=True)
