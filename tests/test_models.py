"""Foundation: every family loads offline, traces read heads/neurons, pairs align with correct spans."""
import pytest
import torch

import modality_circuits as mc
from modality_circuits import tasks
from modality_circuits.data.pairs import LayoutError, batch, build_pairs, make_pair
from modality_circuits.model import ADAPTERS, family_of
from modality_circuits.tasks import Prompt
from modality_circuits.zoo import SHORT_NAMES


def test_trace_reads_heads_and_neurons_at_all_positions(tiny):
    pairs = build_pairs("counting", "image", tiny, n=2)
    inputs = batch([p.inputs for p in pairs])
    T = pairs[0].length
    with tiny.trace(inputs):
        layers = tiny.layers()
        heads = tiny.head_site(layers[0]).input.save()
        neurons = tiny.neuron_site(layers[-1]).input.save()
    assert len(tiny.layers()) == tiny.n_layers
    assert heads.shape == (2, T, tiny.layer_heads[0] * tiny.layer_head_dims[0])
    assert neurons.view(2, T, -1).shape == (2, T, tiny.layer_neurons[-1])  # a sparse layer's site: (2·T, E·I)
    # the trace's values are the model's: compare with a plain forward pass
    with torch.no_grad():
        plain = tiny.hf_model(**inputs)
    with tiny.trace(inputs):
        logits = tiny.nn.output.logits.save()
    torch.testing.assert_close(logits, plain.logits)


@pytest.mark.parametrize("modality", tasks.MODALITIES)
@pytest.mark.parametrize("task", tasks.TASKS)
def test_pairs_align_with_spans(tiny, task, modality):
    pairs = build_pairs(task, modality, tiny, n=3, seed=1)
    for pair in pairs:
        ids, cf_ids = pair.inputs["input_ids"][0], pair.cf_inputs["input_ids"][0]
        assert ids.shape == cf_ids.shape and pair.spans == pairs[0].spans
        (d0, d1), (q0, q1), (g0, g1) = (pair.spans[s] for s in "DQG")
        assert d1 <= q0 < q1 == g0 < g1 == len(ids)
        assert pair.answer_id != pair.cf_answer_id
        tok = tiny.tokenizer
        assert tok.decode(ids[q0:q1]).replace(" ", "") == pair.prompt.query.replace(" ", "")
        if modality == "image":
            image_pos = tiny.image_mask(ids).nonzero().flatten().tolist()
            assert (image_pos[0], image_pos[-1] + 1) == (d0, d1), "D must be exactly the image tokens"
            text_inside = [i for i in range(d0, d1) if i not in image_pos]  # only the family's tile names
            assert all(tok.decode([ids[i]]) in tiny.adapter.image_text for i in text_inside)
        else:
            assert tok.decode(ids[d0:d1]).replace(" ", "") == pair.prompt.data.replace(" ", "")
            assert not tiny.image_mask(ids).any()
        # the answer token is the first token of the answer
        assert tok.decode([pair.answer_id]).strip() == pair.prompt.answer[: len(tok.decode([pair.answer_id]).strip())]


def test_image_and_text_pairs_share_query_and_generation_spans(llava):
    text = build_pairs("color_ordering", "text", llava, n=1, seed=3)[0]
    image = build_pairs("color_ordering", "image", llava, n=1, seed=3)[0]
    tq, iq = text.spans["Q"], image.spans["Q"]
    assert tq[1] - tq[0] == iq[1] - iq[0]
    assert text.inputs["input_ids"][0, tq[0]:].tolist() == image.inputs["input_ids"][0, iq[0]:].tolist()


def _pair(task="counting", modality="text", seed=0, size=64):
    return tasks.sample_pairs(task, modality, 1, seed=seed, image_size=size)[0]


def test_counterfactual_of_different_length_is_refused(llava):
    p, cf = _pair()
    longer = Prompt(cf.task, cf.modality, cf.data + " cat", None, cf.query, cf.answer, cf.meta)
    with pytest.raises(LayoutError, match="tokens"):
        make_pair(llava, p, longer)


def test_counterfactual_with_other_span_layout_is_refused(llava):
    p, cf = _pair()
    words = cf.data.split()
    shifted = Prompt(cf.task, cf.modality, " ".join(words[:-1]), None, "cat " + cf.query, cf.answer, cf.meta)
    with pytest.raises(LayoutError, match="span"):
        make_pair(llava, p, shifted)


def test_image_of_another_size_is_refused(llava):
    p, cf = _pair(modality="image")
    big = Prompt(cf.task, cf.modality, None, cf.image.resize((96, 96)), cf.query, cf.answer, cf.meta)
    with pytest.raises(LayoutError, match="size"):
        make_pair(llava, p, big)


def test_multi_token_answer_is_refused(llava):
    p, cf = _pair(task="sentiment")
    multi = Prompt(p.task, p.modality, p.data, None, p.query, "very happy", p.meta)
    with pytest.raises(ValueError, match="single-token"):
        make_pair(llava, multi, cf)


def test_same_answer_is_refused(llava):
    p, _ = _pair()
    with pytest.raises(LayoutError, match="answers"):
        make_pair(llava, p, p)


def test_unknown_task_and_modality(llava):
    with pytest.raises(ValueError, match="unknown task"):
        build_pairs("juggling", "text", llava, n=1)
    with pytest.raises(ValueError, match="unknown modality"):
        build_pairs("counting", "audio", llava, n=1)


def test_missing_image_file(tmp_path, llava):
    (tmp_path / "factual_recall.csv").write_text("item,question,answer,image\nX,What sport?,tennis,nope.png\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        build_pairs("factual_recall", "image", llava, n=1, data_dir=tmp_path)


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="supported families: .*gemma3.*llava.*qwen2_vl"):
        family_of(GPT2Config())


def test_adapter_table_and_short_names():
    assert {"qwen2_vl", "qwen2_5_vl", "llava", "pixtral", "mistral3", "gemma3"} <= set(ADAPTERS)
    assert SHORT_NAMES["qwen2-vl-7b"] == "Qwen/Qwen2-VL-7B-Instruct"
    assert SHORT_NAMES["pixtral-12b"] == "mistral-community/pixtral-12b"
    assert SHORT_NAMES["gemma-3-12b"] == "google/gemma-3-12b-it"
    assert SHORT_NAMES["paligemma2-3b"] == "google/paligemma2-3b-mix-448"
    assert SHORT_NAMES["llava-onevision-7b"] == "llava-hf/llava-onevision-qwen2-7b-ov-hf"


@pytest.mark.parametrize("field,typo", [("patch_grid", "sqaure"), ("attention", "prefix-lm"), ("image_expansion", "row")])
def test_adapter_kind_fields_refuse_a_typo(field, typo):
    """A kind-naming string field takes one of its listed values; a typo is an error naming the field, not a default."""
    from modality_circuits.model.adapters import KINDS, Adapter

    with pytest.raises(ValueError, match=f"{field}='{typo}' is not one of"):
        Adapter("x", "XForConditionalGeneration", **{field: typo})
    for row in ADAPTERS.values():
        assert all(getattr(row, f) in allowed for f, allowed in KINDS.items())
    for value in KINDS[field]:  # every listed value is accepted
        assert getattr(Adapter("x", "XForConditionalGeneration", **{field: value}), field) == value


def test_load_model_from_saved_checkpoint(tmp_path, tiny):
    """A checkpoint on disk loads through load_model, the same path as a hub id."""
    tiny.hf_model.save_pretrained(tmp_path)
    proc = tiny.processor
    (proc if hasattr(proc, "save_pretrained") else proc.tokenizer).save_pretrained(tmp_path)
    if not hasattr(proc, "save_pretrained"):
        proc.image_processor.save_pretrained(tmp_path)
    loaded = mc.load_model(str(tmp_path))
    assert loaded.adapter == tiny.adapter and loaded.image_token_ids == tiny.image_token_ids
    pair = build_pairs("counting", "image", tiny, n=1)[0]
    with torch.no_grad():
        a = tiny.hf_model(**pair.inputs).logits
        b = loaded.hf_model(**pair.inputs).logits
    torch.testing.assert_close(a, b)


def test_run_settings_are_one_object():
    """remote, retries, retry_backoff, chunks_per_request and memory_budget live in VLM.settings; the keywords and
    attributes of older code still work, a copy with other settings shares the weights, and bad values are refused."""
    import dataclasses

    from modality_circuits.execution.settings import Settings

    model = mc.load_model("tiny-llava")
    assert model.settings == Settings() and model.memory_budget == "auto" and model.remote is False
    copy = dataclasses.replace(model, memory_budget="1GB", chunks_per_request=2)
    assert copy.settings == Settings(memory_budget=2**30, chunks_per_request=2) and copy.nn is model.nn
    assert model.settings == Settings()
    dry = model.with_remote("local")
    assert dry.settings.remote == "local" and dry.settings.chunks_per_request == 8
    dry.retries = 0
    assert dry.settings == Settings(remote="local", retries=0)
    for bad in ({"retries": -1}, {"chunks_per_request": 0}, {"retry_backoff": -1.0}, {"memory_budget": "lots"},
                {"remote": "ftp://x"}):
        with pytest.raises(ValueError):
            dataclasses.replace(model, **bad)
