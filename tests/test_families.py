"""What each family changes in the method (docs/method.md section 13), checked against plain torch hooks."""
import pytest
import torch
import transformers as T
from conftest import get_tiny

from modality_circuits.analyses.alignment import alignment
from modality_circuits.analyses.backpatch import backpatch_logits
from modality_circuits.data.pairs import build_pairs
from modality_circuits.model import family_of


@pytest.mark.parametrize("config, why", [(T.MllamaConfig, "cross-attention"), (T.Florence2Config, "encoder-decoder"),
                                         (T.T5Config, "encoder-decoder"), (T.GPT2Config, "unsupported architecture")])
def test_architectures_the_method_cannot_serve_say_why(config, why):
    with pytest.raises(ValueError, match=f"{why}.*image tokens in its text sequence; supported families: .*qwen3_vl"):
        family_of(config())


def _stream(model, inputs, replace=None):
    """What each decoder layer's successor reads (the final norm's input for the last), via plain pre-hooks.

    replace: {layer: (positions slice, (B, n, d) values)} written into what layer + 1 reads."""
    layers = model.layers(model.hf_model)
    readers = layers[1:] + [model.decoder_stack(model.hf_model).norm]
    seen, handles = [], []
    for i, reader in enumerate(readers):
        def hook(module, args, i=i):
            x = args[0]
            if replace and i in replace:
                where, value = replace[i]
                x = x.clone()
                x[:, where] = value
            seen.append(x.detach().clone())
            return (x, *args[1:])
        handles.append(reader.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model.hf_model(**inputs).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_deepstack_back_patching_writes_the_stream_the_next_layer_reads():
    """Qwen3-VL: cached and written values include the features injected after layers 0 and 1."""
    model = get_tiny("qwen3_vl")
    pairs = build_pairs("arithmetic", "image", model, n=2, seed=0)
    configs = [(1, 0, 1), (2, 0, 1), (2, 1, 1), (1, 0, 2)]
    logits = backpatch_logits(model, pairs, configs)
    d0, d1 = pairs[0].spans["D"]
    for p, pair in enumerate(pairs):
        stream, _ = _stream(model, pair.inputs)
        for c, (src, dst, w) in enumerate(configs):
            writes = {dst + i: (slice(d0, d1), stream[src + i][:, d0:d1]) for i in range(w)}
            _, by_hooks = _stream(model, pair.inputs, writes)
            torch.testing.assert_close(logits[c, p], by_hooks[0], atol=1e-5, rtol=1e-4)


def test_deepstack_alignment_reads_the_stream_after_the_injection():
    model = get_tiny("qwen3_vl")
    image = build_pairs("color_ordering", "image", model, n=2, seed=2)
    text = build_pairs("color_ordering", "text", model, n=2, seed=2)
    res = alignment(model, image, text, resamples=10)
    by_hand = []
    for ip, tp in zip(image, text):
        (i0, i1), (t0, t1) = ip.spans["D"], tp.spans["D"]
        img, _ = _stream(model, ip.inputs)
        txt, _ = _stream(model, tp.inputs)
        sims = [torch.nn.functional.normalize(a[0, i0:i1], dim=-1) @ torch.nn.functional.normalize(b[0, t0:t1], dim=-1).T
                for a, b in zip(img, txt)]
        by_hand.append(torch.stack([s.max(-1).values.mean() for s in sims]))
    torch.testing.assert_close(res.per_prompt, torch.stack(by_hand), atol=1e-5, rtol=1e-4)


def test_tiled_family_llava_onevision_refuses_images_of_another_size():
    """LLaVA-OneVision tiles (anyres): the layout changes with the image size, so only its fixed size is built."""
    from modality_circuits.data.pairs import LayoutError, encode, make_pair
    from modality_circuits.data.tasks import sample_pairs

    model = get_tiny("llava_onevision")
    assert model.adapter.tiles and model.image_size == 64
    p, cf = sample_pairs("counting", "image", 1, seed=0, image_size=96)[0]
    fixed, other = (encode(model, ["<image>"], [sample_pairs("counting", "image", 1, image_size=s)[0][0].image])
                    for s in (64, 96))
    assert (fixed["input_ids"].shape[1], other["input_ids"].shape[1]) == (36, 88)  # 16 + 4x(4+1) vs 16 + 8x(8+1)
    with pytest.raises(LayoutError, match=r"\(96, 96\) is not \(64, 64\).*tiles images.*fixed 64x64"):
        make_pair(model, p, cf)
    with pytest.raises(LayoutError, match="fixed 64x64"):
        build_pairs("counting", "image", model, n=1, image_size=96)
    assert build_pairs("counting", "text", model, n=1, image_size=96)  # text prompts have no image to tile


def test_llava_onevision_anyres_newline_is_the_same_in_prompt_and_counterfactual():
    """The learned newline closing each high-res row sits at an image position of the merged decoder input, equal in
    p and p': interpolating that input from p' to p (integrated gradients) holds it fixed, as it should."""
    from modality_circuits.data.pairs import anyres_rows

    model = get_tiny("llava_onevision")
    pair = build_pairs("counting", "image", model, n=1)[0]
    newlines = [pos for pos, rc in anyres_rows(model, pair)[2].items() if rc is None]
    seen = []
    handle = model.layers(model.hf_model)[0].register_forward_pre_hook(lambda m, args, kw: seen.append(
        (args[0] if args else kw["hidden_states"]).detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model.hf_model(**pair.inputs), model.hf_model(**pair.cf_inputs)
    finally:
        handle.remove()
    newline = model.hf_model.model.image_newline
    for x in seen:
        torch.testing.assert_close(x[0, newlines], newline.expand(len(newlines), -1))
    d0, d1 = pair.spans["D"]
    assert not torch.equal(seen[0][0, d0:d1], seen[1][0, d0:d1])  # the patches differ


def test_paligemma_prompts_are_written_and_attended_as_the_real_checkpoint_reads_them():
    """PaliGemma: no chat template, so the adapter's prompt format; the processor's own <bos> and "\\n" are written
    once; text and image prompts carry token_type_ids of zeros, so the whole prompt attends both ways."""
    from modality_circuits.data.pairs import chat_text
    from modality_circuits.methods.predict import predictions

    model = get_tiny("paligemma")
    assert model.adapter.attention == "prefix" and model.tokenizer.chat_template is None
    for modality in ("image", "text"):
        pair = build_pairs("counting", modality, model, n=1, seed=0)[0]
        text = chat_text(model, pair.prompt)
        assert text.startswith("<image><bos>answer en " if modality == "image" else "<bos>answer en ")
        assert text.endswith("\n") and text.count("<bos>") == 1 and "labels" not in pair.inputs
        n_image = model.image_mask(pair.inputs["input_ids"]).sum().item()
        expanded = text.replace("<image>", "<image>" * n_image)
        assert pair.inputs["input_ids"][0].tolist() == model.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        assert pair.inputs["token_type_ids"].shape == pair.inputs["input_ids"].shape
        assert not pair.inputs["token_type_ids"].any()
        ours = predictions(model, [pair])[0]
        with torch.no_grad():
            plain = model.hf_model(**pair.inputs).logits[0, -1]
            causal = model.hf_model(**{k: v for k, v in pair.inputs.items() if k != "token_type_ids"}).logits[0, -1]
        torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-4)
        assert (plain - causal).abs().max() > 1e-3, modality  # the prefix mask is really in effect


def test_paligemma_backpatching_refuses_prefix_attention_unless_allowed(tmp_path):
    """The data positions see the question: refused before any work, with the reason; the override runs it; the
    study records the skip instead of failing."""
    from modality_circuits.analyses.backpatch import backpatch
    from modality_circuits.execution.store import read_json
    from modality_circuits.study.steps import Study, run_backpatch

    model = get_tiny("paligemma")
    why = r"prefix-LM attention: its data positions attend to the question.*allow_prefix_attention=True"
    with pytest.raises(ValueError, match=why):
        backpatch_logits(model, [], [(1, 0, 1)])  # no pairs: refused before anything looks at them
    with pytest.raises(ValueError, match=why):
        backpatch(model, [])
    pairs = build_pairs("arithmetic", "image", model, n=4, seed=0)
    res = backpatch(model, pairs, configs=[(1, 0, 1)], resamples=10, progress=False, allow_prefix_attention=True)
    assert res.config == (1, 0, 1) and res.n_test == 2
    study = Study(model, out=str(tmp_path), tasks=("arithmetic",), n=4, resamples=10)
    assert "prefix-LM attention" in run_backpatch(study, "arithmetic")["skipped"]
    stored = read_json(study.path("arithmetic", "backpatch.json"))  # the numbers: undefined (null)
    assert "prefix-LM attention" in stored["skipped"] and stored["image"]["gain_points"]["value"] is None
    assert get_tiny("gemma3").adapter.attention == "image_blocks"  # blocks inside D only: back-patching still holds


def test_smolvlm_is_served_by_the_idefics3_row(tmp_path):
    """SmolVLM2's model type "smolvlm" is Idefics3's module tree under another class: it loads with its own class."""
    import modality_circuits as mc
    from modality_circuits.model.adapters import ADAPTERS

    tiny = get_tiny("idefics3")
    cfg = T.SmolVLMConfig(text_config=tiny.hf_model.config.text_config.to_dict(),
                          vision_config=tiny.hf_model.config.vision_config.to_dict(), scale_factor=2,
                          image_token_id=tiny.hf_model.config.image_token_id)
    cfg.architectures = ["SmolVLMForConditionalGeneration"]
    assert family_of(cfg) == "idefics3"
    T.SmolVLMForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    model = mc.load_model(str(tmp_path))
    assert type(model.hf_model).__name__ == "SmolVLMForConditionalGeneration" and model.adapter is ADAPTERS["idefics3"]
    pair = build_pairs("counting", "image", model, n=1, wording="toy")[0]  # the tiny tokenizer knows the toy words
    with model.trace(pair.inputs):
        heads = model.head_site(model.layers()[1]).input.save()
    assert heads.shape == (1, pair.length, model.n_heads * model.head_dim)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5", "qwen3_vl_moe", "glm46v", "gemma4"])
def test_reproduce_completes(tmp_path, family):
    """`modality-circuits reproduce --model tiny-<family> --all-prompts --tasks counting`: DeepStack, hybrid linear
    attention, routed experts, a shared expert, per-layer token embeddings and KV-shared layers."""
    import json

    from modality_circuits.study.cli import main

    main(["reproduce", "--model", f"tiny-{family}", "--all-prompts", "--tasks", "counting", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / f"tiny-{family}" / "summary.json").read_text())
    assert {"accuracy", "niou", "interchange", "backpatch_gain_points", "alignment_first_last"} <= set(summary["counting"])


def test_idefics3_tiles_plus_global_view_at_its_fixed_size():
    """Idefics3 splits an image into tiles plus a global view; D holds all of them, the grid is the global view's."""
    from modality_circuits.data.pairs import LayoutError

    model = get_tiny("idefics3")
    pair = build_pairs("counting", "image", model, n=1)[0]
    d0, d1 = pair.spans["D"]
    ids = model.tokenizer.convert_ids_to_tokens(pair.inputs["input_ids"][0, d0:d1].tolist())
    assert ids.count("<image>") == 5 * 4 and ids.count("<global-img>") == 1 and ids[0] == ids[-1] == "<fake_token_around_image>"
    assert [t for t in ids if t.startswith("<row")] == ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>"]
    rows, cols, where = pair.grid
    assert (rows, cols) == (2, 2) and min(where) > d0 + ids.index("<global-img>")
    with pytest.raises(LayoutError, match="fixed 64x64"):
        build_pairs("counting", "image", model, n=1, image_size=96)


def test_glm4v_neurons_are_the_gated_product_of_the_fused_projection():
    """GLM-4V's fused gate_up_proj: a neuron (the down_proj input) is up * silu(gate) of its halves, by hand."""
    model = get_tiny("glm4v")
    pair = build_pairs("counting", "image", model, n=1)[0]
    mlp = model.layers(model.hf_model)[1].mlp
    fused = []
    handle = mlp.gate_up_proj.register_forward_hook(lambda m, args, out: fused.append(out.detach()))
    with model.trace(pair.inputs):
        neurons = model.neuron_site(model.layers()[1]).input.save()
    handle.remove()
    gate, up = fused[0].chunk(2, dim=-1)
    assert neurons.shape[-1] == model.d_mlp == gate.shape[-1]
    torch.testing.assert_close(neurons, up * torch.nn.functional.silu(gate))


def _real_processor(family, tok):
    """The family's processor with its instruction-tuned checkpoint's published image settings (README table):
    the token layout a real model sees, built on the tiny tokenizer (same special tokens)."""
    from modality_circuits.model.adapters import ADAPTERS
    from modality_circuits.model.processing import MiniProcessor, without_video

    if family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5"):  # Qwen3-VL-8B, -30B-A3B, Qwen3.5: 16 px patches, 2x2 merge
        ip = T.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                        size={"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096})
        return MiniProcessor(tok, ip, ADAPTERS[family], merge=2, patch=16)
    if family == "glm4v":  # GLM-4.1V: 14 px patches, 2x2 merge (the PIL processor's defaults)
        return without_video(T.Glm4vProcessor)(image_processor=T.Glm4vImageProcessorPil(), tokenizer=tok)
    if family == "glm46v":  # GLM-4.6V: 14 px patches, 2x2 merge (the PIL processor's defaults)
        return without_video(T.Glm46VProcessor)(image_processor=T.Glm46VImageProcessorPil(), tokenizer=tok)
    if family == "gemma4":  # Gemma 4: 16 px patches pooled 3x3, at most 280 soft tokens (the PIL processor's defaults)
        return without_video(T.Gemma4Processor)(image_processor=T.Gemma4ImageProcessorPil(), tokenizer=tok)
    if family == "internvl":  # InternVL3-8B-hf: 448 px tiles of 256 tokens, up to 12 tiles
        ip = T.GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True)
        return without_video(T.InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=256)
    if family == "llava_onevision":  # llava-onevision-qwen2-7b-ov-hf: 384 px SigLIP, 27x27 = 729 tokens a view
        return without_video(T.LlavaOnevisionProcessor)(image_processor=T.LlavaOnevisionImageProcessorPil(),
                                                        tokenizer=tok, num_image_tokens=729,
                                                        vision_feature_select_strategy="full")
    if family == "idefics3":  # SmolVLM2-2.2B: resized to 4 x 384 px, 384 px tiles of 81 tokens plus the global view
        ip = T.SmolVLMImageProcessorPil(size={"longest_edge": 4 * 384}, max_image_size={"longest_edge": 384})
        return T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=81)
    if family == "aya_vision":  # aya-vision-8b: 364 px tiles, 14 px patches shuffled 2x2: 13x13 tokens
        ip = T.GotOcr2ImageProcessorPil(size={"height": 364, "width": 364}, crop_to_patches=True)
        return T.AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=28, img_size=364, downsample_factor=1)
    ip = T.SiglipImageProcessorPil(size={"height": 448, "width": 448})  # paligemma2-3b-mix-448: 32x32 patches
    ip.image_seq_length = 1024
    tok.bos_token = "<bos>"
    return T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


@pytest.mark.parametrize("family, image_token, image_tokens, d_tokens", [
    ("qwen3_vl", "<|image_pad|>", 64, 64), ("qwen3_vl_moe", "<|image_pad|>", 64, 64), ("qwen3_5", "<|image_pad|>", 64, 64),
    ("glm4v", "<|image|>", 81, 83), ("glm46v", "<|image|>", 81, 83), ("internvl", "<IMG_CONTEXT>", 256, 258),
    ("llava_onevision", "<image>", 1485, 1485), ("idefics3", "<image>", 17 * 81, 17 * 81 + 18 + 17),
    ("aya_vision", "<|IMG_PATCH|>", 169, 172), ("paligemma", "<image>", 1024, 1024), ("gemma4", "<|image|>", 256, 256)])
def test_real_checkpoint_image_layouts(family, image_token, image_tokens, d_tokens):
    """At the family's image size and its checkpoint's processor settings, an image becomes the README's tokens:
    image tokens, and the D span with its markers and tile names (Idefics3: 18 frame markers, 16 tile names and
    <global-img>; the real tokenizer adds the newlines between rows of tiles)."""
    from PIL import Image

    from modality_circuits.model.adapters import ADAPTERS, default_image_size
    from modality_circuits.zoo.tiny import TINY

    adapter, tok = ADAPTERS[family], TINY[family].template.tokenizer()
    size = default_image_size(adapter, None)
    image = Image.new("RGB", (size, size), "white")
    ids = _real_processor(family, tok)(text=[TINY[family].template.image], images=[[image]],
                                       return_tensors="pt")["input_ids"][0]
    marks = torch.tensor([tok.convert_tokens_to_ids(t) for t in (image_token, *adapter.extra_image_tokens)])
    inside = torch.isin(ids, marks).nonzero().flatten()
    assert int((ids == tok.convert_tokens_to_ids(image_token)).sum()) == image_tokens
    assert int(inside[-1] - inside[0] + 1) == d_tokens
