"""What the study costs at real model width, against a plain-PyTorch floor, projected to full depth.

Builds random-weight models of the study's three VLMs (Qwen/Qwen2-VL-7B-Instruct, mistral-community/pixtral-12b,
google/gemma-3-12b-it) and of Qwen/Qwen3-VL-8B-Instruct (with DeepStack), and on request (--models) of
Qwen/Qwen3-VL-30B-A3B-Instruct (every layer 128 experts, top 8; routing held at p's, docs/families-2026.md) and
Qwen/Qwen3.5-27B (Gated DeltaNet linear attention in three layers of four: --layers 4, 8, ...) with their REAL widths (hidden size, heads, KV heads, head_dim, MLP size, vocabulary, vision
tower) but only `--layers` decoder layers (default 1) and `--vision-layers` vision layers (default 1), wrapped by
`modality_circuits.model.wrap` with the word-level tokenizers of the test zoo (their ids are a subset of the real
vocabulary; embeddings and lm_head keep the real width). Images have the study's sizes: Qwen2-VL 252 px (324
patches, 81 image tokens after the 2x2 merge), Pixtral 252 px (processed as 16x16 patches of 16 px: 256 [IMG] +
15 [IMG_BREAK] + 1 [IMG_END] = 272 tokens), Gemma-3 896 px (4096 patches pooled to 256 tokens), Qwen3-VL 256 px
(16 px patches, 2x2 merge: 64 image tokens; DeepStack from the first vision layers into decoder layers 0...: the
floor hands the features to the decoder stack as the model does, the package adds them to the layer outputs).

Each step runs in its own subprocess on P counting/image pairs (peak RSS, or CUDA peak, is that step's own):
  attribute        modality_circuits.attribute (k steps), as the package runs it
  attribute_floor  the same work in plain PyTorch hooks: merged embeddings of p', p once (vision tower once per
                   prompt), the P(k+1) interpolated rows forward+backward with use_cache=False, last-position logits
                   through one GEMM, gradients at every o_proj and down_proj input, the same float32 scores
  ablation         methods.ablation.ablation_lds with the full and the empty circuit (P p' rows + 2P patched rows)
  ablation_floor   the same embeddings, rows and patching in plain PyTorch hooks
  logits_full      a no-grad forward of the IG rows (layer-0 input given) with logits at every position
  logits_keep1     the same with transformers' integer logits_to_keep=1 (a strided slice: the path the package avoids)
  logits_last      the same with the last position given as an index tensor (one contiguous GEMM): the floor, and
                   what every package trace passes (logits_to_keep=torch.tensor([-1]), VLM.FORWARD)
Ratios compare each step with its floor from the same invocation. A labelled projection to full depth on one
80 GB GPU follows (FLOP and byte model printed with its formula and assumptions).

    python experiments/bench_scale.py --quick                        # smoke test at 1/16 width, about a minute
    python experiments/bench_scale.py --models qwen2_vl --pairs 1 --repeats 1   # real width, 1 layer, CPU
    python experiments/bench_scale.py --device cuda --layers 28 --vision-layers 32 --models qwen2_vl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings

import torch

from modality_circuits.execution.store import write_json

STEPS = ("attribute", "attribute_floor", "ablation", "ablation_floor", "logits_full", "logits_keep1", "logits_last")
#: What the memory projection reads.
MEASURED = ("attribute", "attribute_floor", "ablation", "ablation_floor")
FLOOR = {"attribute": "attribute_floor", "ablation": "ablation_floor", "logits_full": "logits_last",
         "logits_keep1": "logits_last"}
GIB = 2**30

# Real configuration numbers. Sources (looked up with the `search` tool):
#  qwen2_vl: config.json of Qwen/Qwen2-VL-7B-Instruct as copied in fine-tunes of it (e.g.
#    huggingface.co/pbarker/Qwen2-VL-7B-sk-googleflights-full-750-47ep, _name_or_path Qwen/Qwen2-VL-7B-Instruct) and
#    Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int8/config.json: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads,
#    vocab 152064, mrope_section [16, 24, 24]. Its vision_config sets only spatial_patch_size 14; the rest are the
#    Qwen2VLVisionConfig defaults (depth 32, embed_dim 1280, num_heads 16, mlp_ratio 4, spatial_merge_size 2),
#    matching the printed module tree of the loaded model (32 blocks, fc1 1280->5120, merger 5120->3584) and
#    huggingface.co/menglc/DFN-Huge-Qwen2VL-7B/config.json.
#  pixtral: mistralai/Pixtral-12B-2409/params.json (dim 5120, n_layers 40, head_dim 128, hidden_dim 14336, n_heads 32,
#    n_kv_heads 8, vocab 131072; vision 1024 wide, 4096 MLP, 24 layers, 16 heads, 16 px patches, 1024 px) and the
#    transformers conversion mistral-community/pixtral-12b/config.json (LlavaForConditionalGeneration, Mistral text
#    config, vision head_dim 64, projector gelu, vision_feature_layer -1, strategy "full"; copy:
#    huggingface.co/DewEfresh/pixtral-12b-8bit/config.json, _name_or_path mistral-community/pixtral-12b).
#  gemma3: google/gemma-3-12b-it/config.json as mirrored at huggingface.co/unsloth/gemma-3-12b-it-GGUF/config.json:
#    hidden 3840, intermediate 15360, 48 layers, 16 heads, 8 KV heads, head_dim 256, vocab 262208, sliding window 1024;
#    SigLIP vision 1152 wide, 4304 MLP, 27 layers, 16 heads, 14 px patches, 896 px; mm_tokens_per_image 256.
#  qwen3_vl: Qwen/Qwen3-VL-8B-Instruct/config.json as quoted in public code (a local copy printed next to
#    AutoProcessor.from_pretrained(".../Qwen3-VL-8B-Instruct"), transformers 4.57.3, and a test's "official checkpoint"
#    config): hidden 4096, intermediate 12288, 36 layers, 32 heads, 8 KV heads, head_dim 128, vocab 151936,
#    mrope_section [24, 20, 20] interleaved; vision depth 27, 1152 wide, 4304 MLP, 16 heads, 16 px patches, 2x2
#    merge, DeepStack from vision layers [8, 16, 24] into decoder layers 0-2. 256 px images: 8x8 = 64 image tokens.
#  qwen3_vl_moe: Qwen/Qwen3-VL-30B-A3B-Instruct as given in public Megatron training scripts (--model-name
#    Qwen3-VL-30B-A3B-Instruct): 48 layers, hidden 2048, 32 heads, 4 KV groups, kv-channels 128, vocab 151936, 128
#    experts of 768 (moe-ffn-hidden-size), top 8; every layer sparse (transformers' default decoder_sparse_step 1,
#    mlp_only_layers []). NOT verified: the vision tower, taken to be Qwen3-VL-8B's (same family and processor).
#  qwen3_5: Qwen/Qwen3.5-27B as given in a public Megatron script (slime, scripts/models/qwen3.5-27B.sh): 64 layers,
#    hidden 5120, ffn 17408, 24 heads, 4 KV groups, kv-channels 256, gated attention, rotary 0.25, vocab 248320.
#    NOT verified: the Gated DeltaNet sizes (transformers' Qwen3_5TextConfig defaults: 16 key heads of 128, 32 value
#    heads of 128, kernel 4) and the vision tower (Qwen3_5VisionConfig defaults). One full-attention layer in four:
#    build it with --layers a multiple of 4 to keep the real pattern.
REAL = {
    "qwen2_vl": dict(hub_id="Qwen/Qwen2-VL-7B-Instruct", vocab=152064, hidden=3584, intermediate=18944, layers=28,
                     heads=28, kv_heads=4, head_dim=128, mrope_section=(16, 24, 24), vision_hidden=1280,
                     vision_intermediate=5120, vision_layers=32, vision_heads=16, patch=14, merge=2, image_size=252),
    "qwen3_vl": dict(hub_id="Qwen/Qwen3-VL-8B-Instruct", vocab=151936, hidden=4096, intermediate=12288, layers=36,
                     heads=32, kv_heads=8, head_dim=128, mrope_section=(24, 20, 20), vision_hidden=1152,
                     vision_intermediate=4304, vision_layers=27, vision_heads=16, patch=16, merge=2, image_size=256,
                     deepstack=(8, 16, 24)),
    "qwen3_vl_moe": dict(hub_id="Qwen/Qwen3-VL-30B-A3B-Instruct", vocab=151936, hidden=2048, intermediate=6144,
                         layers=48, heads=32, kv_heads=4, head_dim=128, mrope_section=(24, 20, 20), vision_hidden=1152,
                         vision_intermediate=4304, vision_layers=27, vision_heads=16, patch=16, merge=2, image_size=256,
                         deepstack=(8, 16, 24), experts=128, top_k=8, moe_intermediate=768),
    "qwen3_5": dict(hub_id="Qwen/Qwen3.5-27B", vocab=248320, hidden=5120, intermediate=17408, layers=64, heads=24,
                    kv_heads=4, head_dim=256, mrope_section=(11, 11, 10), vision_hidden=1152, vision_intermediate=4304,
                    vision_layers=27, vision_heads=16, patch=16, merge=2, image_size=256, linear_key_heads=16,
                    linear_value_heads=32, linear_head_dim=128),
    "pixtral": dict(hub_id="mistral-community/pixtral-12b", vocab=131072, hidden=5120, intermediate=14336, layers=40,
                    heads=32, kv_heads=8, head_dim=128, vision_hidden=1024, vision_intermediate=4096, vision_layers=24,
                    vision_heads=16, patch=16, image_size=252),
    "gemma3": dict(hub_id="google/gemma-3-12b-it", vocab=262208, hidden=3840, intermediate=15360, layers=48, heads=16,
                   kv_heads=8, head_dim=256, vision_hidden=1152, vision_intermediate=4304, vision_layers=27,
                   vision_heads=16, patch=14, image_size=896, image_tokens=256),
}

#: The models a run measures unless --models names others (the 2026 families are asked for by name).
STUDIED = ("qwen2_vl", "qwen3_vl", "pixtral", "gemma3")
#: The study whose cost is projected: per task and modality (docs/method.md sections 1, 3, 4, 8; `study.steps`).
STUDY = dict(tasks=5, modalities=2, pairs=250, discovery=188, evaluation=62, k=5, fractions=40, candidates=750,
             position_probes=64, interchange_circuits=3 * 2 * (4 + 5))
#: Projection assumptions: H100 dense bf16 ~989 TFLOP/s at 40 % MFU; HBM3 3.35 TB/s at ~60 %; 80 GB card, 8 GB kept free.
GPU = dict(flops=400e12, bandwidth=2e12, budget=72e9, weight_bytes=2)


# ---------------------------------------------------------------- models

def dims(name: str, quick: bool) -> dict:
    """The model's sizes; --quick divides every width by 16 (heads and head_dim by 4, vocabulary by 16), same tokens."""
    d = dict(REAL[name])
    if quick:
        for key in ("hidden", "intermediate", "vocab", "vision_hidden", "vision_intermediate", "moe_intermediate"):
            if key in d:
                d[key] //= 16
        for key in ("heads", "head_dim", "vision_heads", "linear_key_heads", "linear_value_heads", "linear_head_dim"):
            if key in d:
                d[key] //= 4
        d["kv_heads"] = max(1, d["kv_heads"] // 4)
        if "mrope_section" in d:
            d["mrope_section"] = tuple(s // 4 for s in d["mrope_section"])
            while (d["vision_hidden"] // d["vision_heads"]) % 4:  # the vision tower's 2-D rotary needs head_dim % 4 == 0
                d["vision_heads"] //= 2
        if "image_tokens" in d:  # Gemma-3: 224 px = 16x16 patches, pooled 1:1 to the same 256 image tokens
            d["image_size"] = 16 * d["patch"]
    return d


def _text_kw(tok, d: dict, layers: int) -> dict:
    """Decoder config arguments shared by the three families (bos/eos unused: no generation here)."""
    return dict(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                num_hidden_layers=layers, num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)


def _qwen_ids(tok) -> dict:
    """The image and vision start/end token ids of a Qwen-VL config."""
    return {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                         ("vision_start_token_id", "<|vision_start|>"),
                                                         ("vision_end_token_id", "<|vision_end|>"))}


def _qwen_processor(tok, d: dict, family: str):
    """The torchvision-free Qwen-VL processor at the model's patch and merge sizes."""
    import transformers as T

    from modality_circuits.model import ADAPTERS
    from modality_circuits.model.processing import MiniProcessor

    ip = T.Qwen2VLImageProcessorPil(patch_size=d["patch"], merge_size=d["merge"], temporal_patch_size=2)
    return MiniProcessor(tok, ip, ADAPTERS[family], merge=d["merge"], patch=d["patch"])


def _qwen2_vl(tok, d: dict, layers: int, vision_layers: int):
    import transformers as T

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(d["mrope_section"])}
    text = T.Qwen2VLTextConfig(**_text_kw(tok, d, layers), rope_parameters=rope)  # head_dim = hidden / heads
    vision = dict(depth=vision_layers, embed_dim=d["vision_hidden"], hidden_size=d["hidden"], num_heads=d["vision_heads"],
                  mlp_ratio=d["vision_intermediate"] // d["vision_hidden"], patch_size=d["patch"],
                  spatial_merge_size=d["merge"])
    ids = _qwen_ids(tok)
    cfg = T.Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision, **ids)
    processor = _qwen_processor(tok, d, "qwen2_vl")
    return T.Qwen2VLForConditionalGeneration, cfg, processor


def _qwen3_vl(tok, d: dict, layers: int, vision_layers: int):
    """DeepStack from the vision layers of `deepstack` that exist at this depth (at least one), into decoder layers 0..."""
    import transformers as T

    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": list(d["mrope_section"]), "mrope_interleaved": True}
    text = T.Qwen3VLTextConfig(**_text_kw(tok, d, layers), head_dim=d["head_dim"], rope_parameters=rope)
    deepstack = [i for i in d["deepstack"] if i < vision_layers] or [vision_layers - 1]
    vision = dict(depth=vision_layers, hidden_size=d["vision_hidden"], intermediate_size=d["vision_intermediate"],
                  num_heads=d["vision_heads"], patch_size=d["patch"], spatial_merge_size=d["merge"],
                  out_hidden_size=d["hidden"], deepstack_visual_indexes=deepstack[:layers])
    ids = _qwen_ids(tok)
    cfg = T.Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision, **ids)
    processor = _qwen_processor(tok, d, "qwen3_vl")
    return T.Qwen3VLForConditionalGeneration, cfg, processor


def _qwen3_vl_moe(tok, d: dict, layers: int, vision_layers: int):
    """Qwen3-VL with every decoder layer sparse (E experts, top k), DeepStack as `_qwen3_vl`."""
    import transformers as T

    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": list(d["mrope_section"]), "mrope_interleaved": True}
    text = T.Qwen3VLMoeTextConfig(**_text_kw(tok, d, layers), head_dim=d["head_dim"], rope_parameters=rope,
                                  num_experts=d["experts"], num_experts_per_tok=d["top_k"],
                                  moe_intermediate_size=d["moe_intermediate"])
    deepstack = [i for i in d["deepstack"] if i < vision_layers] or [vision_layers - 1]
    vision = dict(depth=vision_layers, hidden_size=d["vision_hidden"], intermediate_size=d["vision_intermediate"],
                  num_heads=d["vision_heads"], patch_size=d["patch"], spatial_merge_size=d["merge"],
                  out_hidden_size=d["hidden"], deepstack_visual_indexes=deepstack[:layers])
    cfg = T.Qwen3VLMoeConfig(text_config=text.to_dict(), vision_config=vision, **_qwen_ids(tok))
    return T.Qwen3VLMoeForConditionalGeneration, cfg, _qwen_processor(tok, d, "qwen3_vl_moe")


def _qwen3_5(tok, d: dict, layers: int, vision_layers: int):
    """Qwen3.5: (linear, linear, linear, full) repeated, so `layers` must be a multiple of 4 (the real pattern)."""
    import transformers as T

    if layers % 4:
        raise ValueError(f"qwen3_5 repeats (linear, linear, linear, full) attention: build a multiple of 4 layers, "
                         f"got --layers {layers}")
    rope = {"rope_type": "default", "rope_theta": 1e7, "mrope_section": list(d["mrope_section"]), "mrope_interleaved": True,
            "partial_rotary_factor": 0.25}
    text = T.Qwen3_5TextConfig(**_text_kw(tok, d, layers), head_dim=d["head_dim"], rope_parameters=rope,
                               linear_num_key_heads=d["linear_key_heads"], linear_num_value_heads=d["linear_value_heads"],
                               linear_key_head_dim=d["linear_head_dim"], linear_value_head_dim=d["linear_head_dim"])
    vision = dict(depth=vision_layers, hidden_size=d["vision_hidden"], intermediate_size=d["vision_intermediate"],
                  num_heads=d["vision_heads"], patch_size=d["patch"], spatial_merge_size=d["merge"],
                  out_hidden_size=d["hidden"])
    cfg = T.Qwen3_5Config(text_config=text.to_dict(), vision_config=vision, **_qwen_ids(tok))
    return T.Qwen3_5ForConditionalGeneration, cfg, _qwen_processor(tok, d, "qwen3_5")


def _pixtral(tok, d: dict, layers: int, vision_layers: int):
    import transformers as T

    from modality_circuits.model import ADAPTERS
    from modality_circuits.model.processing import MiniProcessor

    text = T.MistralConfig(**_text_kw(tok, d, layers), head_dim=d["head_dim"], sliding_window=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    vision = T.PixtralVisionConfig(hidden_size=d["vision_hidden"], intermediate_size=d["vision_intermediate"],
                                   num_hidden_layers=vision_layers, num_attention_heads=d["vision_heads"],
                                   patch_size=d["patch"], image_size=1024)
    cfg = T.LlavaConfig(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full")
    ip = T.PixtralImageProcessorPil(size={"longest_edge": 1024}, patch_size={"height": d["patch"], "width": d["patch"]})
    processor = MiniProcessor(tok, ip, ADAPTERS["pixtral"], merge=1, patch=d["patch"])
    return T.LlavaForConditionalGeneration, cfg, processor


def _gemma3(tok, d: dict, layers: int, vision_layers: int):
    import transformers as T

    text = T.Gemma3TextConfig(**_text_kw(tok, d, layers), head_dim=d["head_dim"], query_pre_attn_scalar=d["head_dim"],
                              sliding_window=1024)
    vision = T.SiglipVisionConfig(hidden_size=d["vision_hidden"], intermediate_size=d["vision_intermediate"],
                                  num_hidden_layers=vision_layers, num_attention_heads=d["vision_heads"],
                                  image_size=d["image_size"], patch_size=d["patch"], vision_use_head=False)
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=d["image_tokens"],
                         image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id,
                         eoi_token_index=tok.eoi_token_id)
    ip = T.Gemma3ImageProcessorPil(size={"height": d["image_size"], "width": d["image_size"]})
    processor = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=d["image_tokens"],
                                  chat_template=tok.chat_template)
    return T.Gemma3ForConditionalGeneration, cfg, processor


BUILDERS = {"qwen2_vl": _qwen2_vl, "qwen3_vl": _qwen3_vl, "pixtral": _pixtral, "gemma3": _gemma3,
            "qwen3_vl_moe": _qwen3_vl_moe, "qwen3_5": _qwen3_5}
VISION_BLOCKS = {"qwen2_vl": "model.visual.blocks", "qwen3_vl": "model.visual.blocks", "pixtral": "model.vision_tower.transformer.layers",
                 "gemma3": "model.vision_tower.encoder.layers", "qwen3_vl_moe": "model.visual.blocks",
                 "qwen3_5": "model.visual.blocks"}


def build(name: str, *, layers: int, vision_layers: int, quick: bool, dtype, device):
    """A random-weight VLM of `name` at real (or --quick) width, wrapped by modality_circuits.model.wrap.

    device "meta" builds the weightless skeleton (parameter counts, token layouts) in no memory.
    """
    from modality_circuits.model import wrap
    from modality_circuits.zoo.tiny import TINY

    d = dims(name, quick)
    tok = TINY[name].template.tokenizer()
    cls, cfg, processor = BUILDERS[name](tok, d, layers, vision_layers)
    torch.manual_seed(0)
    with torch.device(device):
        hf = cls._from_config(cfg, dtype=dtype)
    if hf.device.type != "meta":
        with torch.no_grad():  # some inits zero a matrix (Gemma-3's projector): no signal would pass it
            for param in hf.parameters():
                if param.ndim >= 2 and not param.any():
                    param.normal_(std=param.shape[0] ** -0.5)
    return wrap(hf, processor, name=f"scale-{name}", image_size=d["image_size"], wording="toy")  # word-level tokenizer


def image_pairs(model, n: int, modality: str = "image"):
    """n aligned counting pairs of `modality` at the model's study image size."""
    from modality_circuits.tasks import build_pairs

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return build_pairs("counting", modality, model, n=n, seed=0, image_size=model.image_size)


# ---------------------------------------------------------------- steps

class _Stop(Exception):
    """Raised by a hook to end a forward once layer 0's input is known."""


def embed(model, pairs):
    """Decoder inputs (merged embeddings) of every pair's p' then p, (2P, T, d), and the visual features the decoder
    stack adds after its first layers (Qwen3-VL's DeepStack: (n, 2P, T, d), zero off the image positions; else None).
    The vision tower runs once per prompt."""
    from modality_circuits.data.pairs import batch

    both, got = model.prepare(batch([p.cf_inputs for p in pairs] + [p.inputs for p in pairs])), {}
    keys = model.adapter.injections

    def grab_injected(module, args, kwargs):  # the stack receives them as a keyword, before layer 0 runs
        if keys and kwargs.get(keys[0]) is not None:
            got["feats"], got["where"] = kwargs[keys[0]], kwargs[keys[1]]

    def grab(module, args):
        got["e"] = args[0].detach()
        raise _Stop

    handles = [model.decoder_stack(model.hf_model).register_forward_pre_hook(grab_injected, with_kwargs=True),
               model.layers(model.hf_model)[0].register_forward_pre_hook(grab)]
    try:
        with torch.no_grad():
            model.hf_model(**both, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    e, g = got["e"], None
    if "feats" in got:
        g = e.new_zeros(len(got["feats"]), *e.shape)
        g[:, got["where"]] = torch.stack(got["feats"]).to(e.dtype)
    return e, g


def decoder_logits(model, rows: dict, x: torch.Tensor, keep, g=None) -> torch.Tensor:
    """Logits of a forward of `rows` (vision inputs dropped) whose layer-0 input is x; `keep` is logits_to_keep;
    g: (n, rows, T, d) features handed to the decoder stack as the model itself does (Qwen3-VL's DeepStack)."""
    hf = model.hf_model
    handles = [model.layers(hf)[0].register_forward_pre_hook(lambda module, args: (x, *args[1:]))]
    if g is not None:
        mask = model.image_mask(rows["input_ids"])
        keys = model.adapter.injections

        def hand(module, args, kwargs):
            return args, {**kwargs, keys[0]: [f[mask] for f in g], keys[1]: mask}
        handles.append(model.decoder_stack(hf).register_forward_pre_hook(hand, with_kwargs=True))
    try:
        return hf(**model.decoder_inputs(rows), use_cache=False, logits_to_keep=keep).logits
    finally:
        for handle in handles:
            handle.remove()


def last(model, pairs) -> torch.Tensor:
    """logits_to_keep as an index tensor: transformers gathers a contiguous (rows, 1, d), which folds into one GEMM.

    (logits_to_keep=1 slices a non-contiguous (rows, 1, d) view; with frozen weights torch's matmul then does not
    fold it and broadcasts lm_head's weight to every row: a rows x d x V copy. The logits_keep1 step measures that;
    the package passes an index tensor too, `VLM.FORWARD`.)
    """
    return torch.tensor([pairs[0].length - 1], device=model.device)


def _ig_rows(model, pairs, k: int) -> dict:
    """The attribution rows, as attribute builds them: per pair p' then p repeated k times."""
    from modality_circuits.data.pairs import batch

    return model.prepare(batch([x for p in pairs for x in [p.cf_inputs] + [p.inputs] * k]))


def _interpolated(model, pairs, k: int):
    """Layer-0 inputs x_j = e' + j/k (e - e') of the IG rows, computed in float32 and cast back, (P (k+1), T, d),
    and the injected features moved along the same path ((n, P (k+1), T, d), or None)."""
    e0, g0 = embed(model, pairs)
    P = len(pairs)
    alpha = (torch.arange(k + 1, dtype=torch.float32, device=e0.device) / k).view(-1, 1, 1)

    def path(t):  # (2P, ...) -> (P (k+1), ...)
        cf, p = t[:P].float().unsqueeze(1), t[P:].float().unsqueeze(1)
        return (cf + alpha * (p - cf)).to(t.dtype).flatten(0, 1)
    return path(e0), None if g0 is None else torch.stack([path(g) for g in g0])


def _answers(pairs) -> torch.Tensor:
    """(P, 2) answer ids (r, r') of each pair."""
    return torch.tensor([[p.answer_id, p.cf_answer_id] for p in pairs])


def _floor_ig_chunk(model, pairs, k: int, sums: list) -> None:
    """One chunk of IG in plain PyTorch; adds float32 score sums and squares per kind and layer to `sums`."""
    P, R, T = len(pairs), k + 1, pairs[0].length
    x, g = _interpolated(model, pairs, k)
    x.requires_grad_(True)  # frozen weights: gradients flow via x
    held = {}

    def keep(key):
        def hook(module, args):
            args[0].retain_grad()
            held[key] = args[0]
        return hook

    def route(module, args):  # sparse layers: every row routed as its pair's p (the last row), weights constant
        top, w = (t.view(P, R, -1, t.shape[-1])[:, -1:].expand(-1, R, -1, -1).reshape(t.shape) for t in args[1:3])
        return (args[0], top, w.detach())

    handles = []
    for i, layer in enumerate(model.layers(model.hf_model)):
        handles.append(model.head_site(layer).register_forward_pre_hook(keep((i, 0))))
        if model.experts_of(layer) is not None:
            handles.append(model.experts_of(layer).register_forward_pre_hook(route))
        handles.append(model.neuron_site(layer).register_forward_pre_hook(keep((i, 1))))
    try:
        logits = decoder_logits(model, _ig_rows(model, pairs, k), x, last(model, pairs), g)[:, -1].float()
        ld = logits.view(P, R, -1)[:, 1:].gather(-1, _answers(pairs).to(logits.device).view(P, 1, 2).expand(P, k, 2))
        (ld[..., 0] - ld[..., 1]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    for (i, j), a in held.items():  # a sparse layer's neurons arrive as (rows·T, E·I)
        act, g = a.detach().view(P, R, T, -1), a.grad.view(P, R, T, -1)[:, 1:].float().mean(1)
        s = (act[:, 0] - act[:, -1]).float() * g  # (P, T, width)
        if j == 0:
            s = s.view(*s.shape[:2], model.layer_heads[i], -1).sum(-1)
        width = s.shape[-1]  # a narrower layer fills the first units of the padded layout
        sums[j][i][..., :width] += s.sum(0).cpu()
        sums[2 + j][i][..., :width] += (s * s).sum(0).cpu()


def floor_attribute(model, pairs, k: int) -> torch.Tensor:
    """attribute's work in plain PyTorch hooks, in the chunks the package's memory budget gives it; returns mean
    head scores (L, T, H)."""
    from modality_circuits.execution import budget

    T, L = pairs[0].length, model.n_layers
    sums = [torch.zeros(L, T, n) for n in (model.n_heads, model.d_mlp, model.n_heads, model.d_mlp)]
    per = max(1, budget.rows(model, T, backward=True) // (k + 1))
    for start in range(0, len(pairs), per):
        _floor_ig_chunk(model, pairs[start:start + per], k, sums)
    return sums[0] / len(pairs)


def circuits(model, pairs):
    """The full and the empty circuit of the pairs' layout (`Circuit.full`)."""
    from modality_circuits.circuits.circuit import Circuit

    T, L = pairs[0].length, model.n_layers
    like = Circuit(torch.ones(L, model.n_heads, T, dtype=torch.bool), torch.ones(L, model.d_mlp, T, dtype=torch.bool),
                   dict(pairs[0].spans), model.name)
    return [Circuit.full(like, True), Circuit.full(like, False)]


def floor_ablation(model, pairs, circs) -> torch.Tensor:
    """ablation_lds in plain PyTorch: embeddings once, then P p' rows and P rows per circuit, one forward;
    nodes outside a circuit take their p' values."""
    from modality_circuits.data.pairs import batch

    P, n, T = len(pairs), len(circs), pairs[0].length
    e, g = embed(model, pairs)
    g_rows = None if g is None else torch.cat([g[:, :P]] + [g[:, P:]] * n, 1)
    rows = model.prepare(batch([p.cf_inputs for p in pairs] + [p.inputs for p in pairs] * n))
    circ_of_row, src = torch.arange(n).repeat_interleave(P), torch.arange(n * P) % P
    keeps = (torch.stack([c.heads for c in circs]), torch.stack([c.neurons for c in circs]))
    experts = [m for m in map(model.experts_of, model.layers(model.hf_model)) if m is not None]
    routes = []  # sparse layers: every row routed as its prompt p, from one clean forward of the p rows
    if experts:
        grab = [m.register_forward_pre_hook(lambda m, args: routes.append([t.view(P, T, -1) for t in args[1:3]]))
                for m in experts]
        try:
            with torch.no_grad():
                model.hf_model(**model.prepare(batch([p.inputs for p in pairs])), use_cache=False,
                               logits_to_keep=last(model, pairs))
        finally:
            for handle in grab:
                handle.remove()

    def patch(i, j):
        def hook(module, args):
            a = args[0].view(-1, T, args[0].shape[-1])  # a sparse layer's neurons arrive as (rows·T, E·I)
            own, cf = a[P:], a[:P][src.to(a.device)]
            k = keeps[j][:, i][circ_of_row].transpose(1, 2).to(a.device)  # (nP, T, units)
            if j == 0:
                H = model.layer_heads[i]
                own, cf, k = own.view(*own.shape[:2], H, -1), cf.view(*cf.shape[:2], H, -1), k.unsqueeze(-1)
            k = k[:, :, :own.shape[2]]  # a narrower layer: its own units of the padded layout
            return (torch.cat([a[:P], torch.where(k, own, cf).flatten(2)]).view(args[0].shape), *args[1:])
        return hook

    def route(r):
        return lambda module, args: (args[0], *(t.repeat(n + 1, 1, 1).flatten(0, 1) for t in r))

    handles, clean = [], iter(routes)  # one routing per sparse layer, in layer order
    for i, layer in enumerate(model.layers(model.hf_model)):
        handles.append(model.head_site(layer).register_forward_pre_hook(patch(i, 0)))
        if model.experts_of(layer) is not None:
            handles.append(model.experts_of(layer).register_forward_pre_hook(route(next(clean))))
        handles.append(model.neuron_site(layer).register_forward_pre_hook(patch(i, 1)))
    try:
        with torch.no_grad():
            logits = decoder_logits(model, rows, torch.cat([e[:P]] + [e[P:]] * n), last(model, pairs),
                                    g_rows)[P:, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    ld = logits.gather(-1, _answers(pairs).repeat(n, 1).to(logits.device))
    return (ld[:, 0] - ld[:, 1]).view(n, P)


def step_fn(step: str, model, pairs, k: int):
    """A zero-argument callable running `step`, returning a checksum of its result (|scores|, |LD| or |logits| summed).

    The logits steps time one no-grad forward of the IG rows from precomputed layer-0 inputs (no vision tower):
    logits at every position (keep 0), transformers' integer logits_to_keep=1, or the index tensor the package passes.
    """
    from modality_circuits import attribute
    from modality_circuits.methods.ablation import ablation_lds

    if step.startswith("logits"):
        rows, (x, g) = _ig_rows(model, pairs, k), _interpolated(model, pairs, k)
        keep = {"logits_full": 0, "logits_keep1": 1, "logits_last": last(model, pairs)}[step]

        def forward():
            with torch.no_grad():
                return decoder_logits(model, rows, x, keep, g)[:, -1].float().abs().sum()
        return forward
    circs = circuits(model, pairs)
    return {
        "attribute": lambda: attribute(model, pairs, steps=k, progress=False).heads.abs().sum(),
        "attribute_floor": lambda: floor_attribute(model, pairs, k).abs().sum(),
        "ablation": lambda: ablation_lds(model, circs, pairs).abs().sum(),
        "ablation_floor": lambda: floor_ablation(model, pairs, circs).abs().sum(),
    }[step]


def step_rows(step: str, pairs: int, k: int) -> int:
    """Batch rows of the decoder forward(s) one call of `step` runs (besides the 2P-prompt embedding pass)."""
    return 3 * pairs if step.startswith("ablation") else pairs * (k + 1)


def budget_row_bytes(model, step: str, T: int):
    """The package's own per-row memory model (execution/budget.py) for attribute or ablation; None for other steps."""
    from modality_circuits.execution import budget

    return budget.row_bytes(model, T, backward=step == "attribute") if step in ("attribute", "ablation") else None


# ---------------------------------------------------------------- measurement (child process)

def _rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak(cuda: bool) -> bool:
    """Start peak tracking here: CUDA peak stats, or the kernel's RSS high-water mark (/proc/self/clear_refs)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(run, repeats: int, cuda: bool) -> dict:
    """Run `run` `repeats` times: CPU and wall seconds each, memory before, peak memory over all of them."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reset = _reset_peak(cuda)
    base = torch.cuda.memory_allocated() if cuda else _rss()
    cpu, wall, check = [], [], None
    for _ in range(repeats):
        sync()
        c0, w0 = time.process_time(), time.perf_counter()
        check = float(run())
        sync()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(cpu_s=cpu, wall_s=wall, base_bytes=base, peak_bytes=peak, peak_reset=reset, check=check)


def child(args) -> dict:
    """Build one model, its pairs, and measure one step (the --child entry point)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    name = args.models[0]
    t0 = time.perf_counter()
    model = build(name, layers=args.layers, vision_layers=args.vision_layers, quick=args.quick,
                  dtype=getattr(torch, args.dtype), device=args.device)
    pairs = image_pairs(model, args.pairs)
    setup_s = time.perf_counter() - t0
    result = measure(step_fn(args.child, model, pairs, args.steps), args.repeats, args.device == "cuda")
    T, (d0, d1) = pairs[0].length, pairs[0].spans["D"]
    return dict(result, setup_s=setup_s, T=T, image_tokens=d1 - d0, rows=step_rows(args.child, len(pairs), args.steps),
                params=sum(p.numel() for p in model.hf_model.parameters()),
                budget_row_bytes=budget_row_bytes(model, args.child, T))


# ---------------------------------------------------------------- parent: runs, table

def run_child(args, name: str, step: str) -> dict:
    """Measure `step` of model `name` in a fresh interpreter; the result, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step, "--models", name, "--layers", str(args.layers),
           "--vision-layers", str(args.vision_layers), "--pairs", str(args.pairs), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--dtype", args.dtype,
           "--device", args.device] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_steps(args, name: str) -> dict:
    """Every step of one model, `args.jobs` child processes at a time; progress printed as they finish."""
    from concurrent.futures import ThreadPoolExecutor

    def one(step):
        r = run_child(args, name, step)
        print(f"  {name} {step}: " + (r.get("error") or f"{min(seconds(r, args.device == 'cuda')):.2f} s"), flush=True)
        return r

    chosen = [s for s in STEPS if s not in args.skip]
    with ThreadPoolExecutor(args.jobs) as pool:
        return dict(zip(chosen, pool.map(one, chosen)))


def seconds(r: dict, cuda: bool) -> list[float]:
    """The timing that counts: CPU seconds on the CPU (1 thread by default), wall seconds on a GPU."""
    return r["wall_s"] if cuda else r["cpu_s"]


def print_table(name: str, results: dict, cuda: bool) -> None:
    """One model's steps: time (min, spread), peak memory and growth during the step, ratios to the floor."""
    unit, mem = ("wall s", "CUDA peak") if cuda else ("CPU s", "peak RSS")
    ok = [results[s] for s in STEPS if s in results and "error" not in results[s]]
    if ok:
        r = ok[0]
        print(f"\n{name}: T = {r['T']} tokens ({r['image_tokens']} image tokens), {r['params'] / 1e6:.0f} M parameters"
              f" built; rows: IG {results.get('attribute', {}).get('rows', '?')},"
              f" ablation {results.get('ablation', {}).get('rows', '?')}")
    print(f"  {'step':16s} {unit:>8s} {'spread':>7s} {mem + ' GiB':>13s} {'+step GiB':>10s} {'x floor s':>10s}"
          f" {'x floor +mem':>13s} {'check':>10s}")
    for step in [s for s in STEPS if s in results]:
        r = results[step]
        if "error" in r:
            print(f"  {step:16s} FAILED {r['error']}")
            continue
        t, grow = seconds(r, cuda), (r["peak_bytes"] - r["base_bytes"]) / GIB
        floor = results[FLOOR.get(step, step)]
        ratio_t = ratio_m = ""
        if "error" not in floor:
            ratio_t = f"{min(t) / min(seconds(floor, cuda)):.2f}x"
            ratio_m = f"{grow / max((floor['peak_bytes'] - floor['base_bytes']) / GIB, 1e-9):.2f}x"
        spread = (max(t) - min(t)) / min(t) * 100
        print(f"  {step:16s} {min(t):8.2f} {spread:6.1f}% {r['peak_bytes'] / GIB:13.2f} {grow:10.2f} {ratio_t:>10s}"
              f" {ratio_m:>13s} {r['check']:10.4g}")
    for step in ("attribute", "ablation"):
        r = results.get(step, {"error": "skipped"})
        if "error" not in r and r.get("budget_row_bytes"):
            print(f"  {step}: measured {per_row_bytes(r) / GIB:.3f} GiB per row; the package's budget model"
                  f" (execution/budget.py) {r['budget_row_bytes'] / GIB:.3f} GiB")


# ---------------------------------------------------------------- projection

def shape(name: str, *, layers: int, vision_layers: int, quick: bool) -> dict:
    """What the FLOP/byte model needs, read off the weightless skeleton: parameter counts, widths, sequence lengths,
    and the package's own per-row memory model (execution/budget.py) at that depth. p_layer and attn are means over
    the layers: the parameters a token uses (a sparse layer: the shared parts and top_k of its E experts) and the
    softmax-attention width (0 on linear-attention layers)."""
    import operator

    model = build(name, layers=layers, vision_layers=vision_layers, quick=quick, dtype=torch.bfloat16, device="meta")
    hf, d = model.hf_model, dims(name, quick)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    T_image = image_pairs(model, 1)[0].length
    active, attn = [], []  # per layer: parameters a token uses (top_k of E experts), softmax-attention width
    for i, layer in enumerate(model.layers(hf)):
        experts = model.experts_of(layer)
        unused = count(experts) * (1 - d["top_k"] / d["experts"]) if experts is not None else 0
        active.append(count(layer) - unused)
        # linear-attention layers: no T^2 term (their state update is linear in T and counted in p_layer)
        attn.append(model.layer_heads[i] * model.layer_head_dims[i] if hasattr(layer, "self_attn") else 0)
    return dict(params=count(hf), p_layer=sum(active) / len(active),
                p_vlayer=count(operator.attrgetter(VISION_BLOCKS[name])(hf)[0]), L=layers, Lv=vision_layers,
                patches=(d["image_size"] // d["patch"]) ** 2, d=d["hidden"], V=d["vocab"], dv=d["vision_hidden"],
                attn=sum(attn) / len(attn), T_image=T_image, T_text=image_pairs(model, 1, "text")[0].length,
                budget_ig=budget_row_bytes(model, "attribute", T_image),
                budget_fwd=budget_row_bytes(model, "ablation", T_image))


def vision_flops(s: dict) -> float:
    """Forward FLOPs of the vision tower on one image: Lv (2 p_vlayer N + 4 N^2 dv)."""
    return s["Lv"] * (2 * s["p_vlayer"] * s["patches"] + 4 * s["patches"] ** 2 * s["dv"])


def fwd_flops(s: dict, T: int) -> float:
    """Forward FLOPs of one decoder row, logits at the last position: L (2 p_layer T + 4 T^2 H hd) + 2 d V."""
    return s["L"] * (2 * s["p_layer"] * T + 4 * T * T * s["attn"]) + 2 * s["d"] * s["V"]


def bwd_flops(s: dict, T: int) -> float:
    """Backward FLOPs of one row with frozen weights (input gradients only): L (2 p_layer T + 8 T^2 H hd) + 2 d V."""
    return s["L"] * (2 * s["p_layer"] * T + 8 * T * T * s["attn"]) + 2 * s["d"] * s["V"]


def ablation_rows(P: int, C: int, rows: int) -> int:
    """Decoder rows of ablation_lds for C circuits on P pairs in chunks of `rows` rows: every trace repeats the
    p' rows of its pairs (pairs are split when 2P rows do not fit)."""
    part = min(P, max(1, rows // 2))
    per_chunk = max(1, rows // part - 1)
    return math.ceil(P / part) * (math.ceil(C / per_chunk) * part + C * part)


def backpatch_share(L: int) -> float:
    """Mean share of the decoder a back-patching config runs: the layers below dst are skipped
    (modality_circuits.analyses.backpatch), averaged over the study's config grid."""
    from modality_circuits.analyses.backpatch import default_configs

    configs = default_configs(L)
    return sum((L - dst) / L for _, dst, _ in configs) / len(configs), len(configs)


def study_work(s: dict, rows: int) -> dict:
    """Per study step: decoder-forward FLOPs, image and text summed over the tasks; `rows`: forward rows per chunk.

    Every step computes decoder inputs once per prompt (the vision tower sees each image once).
    """
    st, selection = STUDY, STUDY["candidates"] // 2
    share, n_configs = backpatch_share(s["L"])
    out = {}
    for image, T in ((True, s["T_image"]), (False, s["T_text"])):
        ig = st["discovery"] * (st["k"] + 1)
        probes = min(T, st["position_probes"]) + 1
        steps = {"accuracy": (st["candidates"], 0, st["candidates"]),
                 "attribution": (ig, ig, 2 * st["discovery"]),
                 "curves": (ablation_rows(st["evaluation"], st["fractions"] + 2, rows), 0, 2 * st["evaluation"]),
                 "position_effect": (ablation_rows(st["evaluation"], probes, rows), 0, 2 * st["evaluation"]),
                 "interchange": (ablation_rows(st["evaluation"], st["interchange_circuits"], rows), 0,
                                 2 * st["evaluation"]),
                 "alignment": (st["candidates"], 0, st["candidates"]),
                 # cache pass + base on the selection half, every config (layers below dst skipped), 3 on the test half
                 "backpatch": (selection * (2 + n_configs * share) + (st["candidates"] - selection) * 3, 0,
                               st["candidates"])}
        for key, (f, b, n) in steps.items():
            flops = f * fwd_flops(s, T) + b * bwd_flops(s, T) + (n * vision_flops(s) if image else 0)
            out[key] = out.get(key, 0.0) + st["tasks"] * flops
    return out


def per_row_bytes(r: dict) -> float:
    """Memory a step added per batch row: peak minus what was held before it, over its rows."""
    return (r["peak_bytes"] - r["base_bytes"]) / r["rows"]


def _memory(full: dict, results: dict, layers_run: int) -> dict:
    """Projected bytes per IG and forward row at full depth, safe rows per chunk, and the rows the package's own
    budget model would put in one chunk on an 80 GB card ("auto": 0.8 of the memory left by the weights)."""
    weights = full["params"] * GPU["weight_bytes"]
    room, auto = GPU["budget"] - weights, 0.8 * (80e9 - weights)
    floor, lib = per_row_bytes(results["attribute_floor"]), per_row_bytes(results["attribute"])
    rows = {("ig", "floor"): floor / layers_run * full["L"], ("ig", "package"): floor / layers_run * full["L"] + lib - floor,
            ("fwd", "floor"): per_row_bytes(results["ablation_floor"]), ("fwd", "package"): per_row_bytes(results["ablation"])}
    out = {f"gb_per_{kind}_row_{who}": v / 1e9 for (kind, who), v in rows.items()}
    out.update({f"safe_{kind}_rows_{who}": max(0, int(room // v)) for (kind, who), v in rows.items()})
    for kind in ("ig", "fwd"):
        out[f"budget_gb_per_{kind}_row"] = full[f"budget_{kind}"] / 1e9
        out[f"budget_{kind}_rows"] = max(1, int(auto // full[f"budget_{kind}"]))
    return out


def project(name: str, results: dict, args) -> dict:
    """Full-depth projection for one 80 GB GPU: FLOP model for time, measured per-row memory scaled to full depth."""
    full = shape(name, layers=REAL[name]["layers"], vision_layers=REAL[name]["vision_layers"], quick=False)
    weights = full["params"] * GPU["weight_bytes"]
    out = dict(weights_gb=weights / 1e9, T_image=full["T_image"], T_text=full["T_text"])
    rows = max(1, int(0.8 * (80e9 - weights) // full["budget_fwd"]))  # what "auto" gives a forward on an 80 GB card
    out["hours"] = {k: f / GPU["flops"] / 3600 for k, f in study_work(full, rows).items()}
    if all(s in results and "error" not in results[s] for s in MEASURED):
        out.update(_memory(full, results, args.layers))
        for kind in ("ig", "fwd"):  # peak of a chunk the budget chooses, with the measured per-row bytes
            out[f"peak_gb_{kind}"] = out["weights_gb"] + out[f"budget_{kind}_rows"] * out[f"gb_per_{kind}_row_package"]
        ran = shape(name, layers=args.layers, vision_layers=args.vision_layers, quick=args.quick)
        r = results["attribute_floor"]
        flops = r["rows"] * (fwd_flops(ran, ran["T_image"]) + bwd_flops(ran, ran["T_image"]))
        flops += 2 * args.pairs * vision_flops(ran)
        out["floor_gflops_per_s"] = flops / min(seconds(r, args.device == "cuda")) / 1e9
    return out


def print_projection(projections: dict, args) -> None:
    """The assumptions, the formulas and the projected figures, labelled as a projection."""
    st = STUDY
    print("\nPROJECTION to full depth on one 80 GB GPU (a model, not a measurement)")
    print(f"  assumptions: bf16 weights {GPU['weight_bytes']} B/param (real parameter count from the full-depth skeleton);"
          f" {GPU['flops'] / 1e12:.0f} TFLOP/s effective (H100 bf16 dense ~989 TFLOP/s at 40 % MFU);"
          f" {GPU['bandwidth'] / 1e12:.0f} TB/s effective HBM; {GPU['budget'] / 1e9:.0f} GB usable")
    print("  FLOPs: decoder row forward L(2 p_layer T + 4 T^2 H hd) + 2 d V (last-position logits); backward"
          " L(2 p_layer T + 8 T^2 H hd) + 2 d V (weights frozen: input gradients only); vision tower per image"
          " Lv(2 p_vlayer N + 4 N^2 dv), once per prompt")
    print("  back-patching: the layers below dst are skipped (share of the decoder run averaged over the config"
          " grid); position effect: at most 64 probed positions + the unpatched run")
    print(f"  GB/IG row = floor bytes per row and layer (measured at {args.layers} layer(s), so embedding, vision and"
          " head terms count per layer too: conservative) x L; package: + its measured extra per row over the floor,"
          " taken as depth-independent. GB/forward row: measured per row of ablation / ablation_floor (a no-grad"
          " forward holds one layer at a time). safe rows = (budget - weights) / GB per row")
    print("  budget model: modality_circuits.execution.budget.row_bytes at full depth; its rows = 0.8 (80 GB -"
          " weights) / modelled row; projected peak = weights + those rows x measured package GB per row")
    print(f"  study: {st['tasks']} tasks x {st['modalities']} modalities x {st['pairs']} pairs; IG k={st['k']} on"
          f" {st['discovery']} discovery pairs; curves {st['fractions']}+2 circuits on {st['evaluation']} evaluation"
          f" pairs; position effect min(T, {st['position_probes']})+1 ablations on them; interchange"
          f" {st['interchange_circuits']} ablations; back-patching the default grid on {st['candidates'] // 2} selection"
          f" prompts (+3 on the test half); accuracy and alignment on {st['candidates']} candidates; ablation rows as"
          " ablation_lds chunks them (every trace repeats the p' rows of its pairs)")
    if args.quick:
        print("  --quick: measured bytes are of 1/16-width models; the memory figures below mean nothing")
    for name, p in projections.items():
        print(f"\n  {name} ({REAL[name]['hub_id']}): {p['weights_gb']:.1f} GB weights, T = {p['T_image']} (image)"
              f" / {p['T_text']} (text)")
        for kind, label in (("ig", "IG row"), ("fwd", "forward row")):
            if f"gb_per_{kind}_row_floor" in p:
                print(f"    {label:11s}: package {p[f'gb_per_{kind}_row_package']:.3f} GB, floor"
                      f" {p[f'gb_per_{kind}_row_floor']:.3f} GB; safe rows per chunk: package"
                      f" {p[f'safe_{kind}_rows_package']}, floor {p[f'safe_{kind}_rows_floor']};"
                      f" budget model {p[f'budget_gb_per_{kind}_row']:.3f} GB -> chunks of {p[f'budget_{kind}_rows']}"
                      f" -> projected peak {p[f'peak_gb_{kind}']:.1f} GB")
        if "floor_gflops_per_s" in p:
            print(f"    FLOP model check: the measured floor IG ran at {p['floor_gflops_per_s']:.0f} GFLOP/s here")
        h = p["hours"]
        print("    hours (FLOP model): " + ", ".join(f"{k} {v:.2f}" for k, v in h.items())
              + f"; total {sum(h.values()):.2f} GPU-hours")


# ---------------------------------------------------------------- main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=tuple(REAL), default=list(STUDIED))
    p.add_argument("--layers", type=int, default=1, help="decoder layers built (real widths)")
    p.add_argument("--vision-layers", type=int, default=1, help="vision-tower layers built")
    p.add_argument("--pairs", type=int, default=4, help="counting/image pairs per step")
    p.add_argument("--steps", type=int, default=5, help="integrated-gradient steps k")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="1/16 widths: smoke-test the script")
    p.add_argument("--jobs", type=int, help="child processes at once (default 2 with --quick, else 1: measured"
                   " runs should not share the CPU)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS,
                   help="steps not to run, e.g. logits_keep1 (the slow int logits_to_keep path the package avoids)")
    p.add_argument("--project-from", metavar="JSON", help="print the projection from a --json file of measurements"
                   " (with --json: write them with the new projection there)")
    p.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.jobs = args.jobs or (2 if args.quick else 1)
    return args


def main():
    args = parse()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.project_from:  # the projection again, from measurements saved by --json (e.g. after a model change)
        with open(args.project_from) as f:
            report = json.load(f)
        saved = argparse.Namespace(**{**vars(args), **report["args"], "project_from": None})
        projections = {name: project(name, m["steps"], saved) for name, m in report["models"].items()}
        print_projection(projections, saved)
        if args.json:  # the measurements with this projection, e.g. back into the file they came from
            for name, projection in projections.items():
                report["models"][name]["projection"] = projection
            write_json(args.json, report)
        return
    print(f"bench_scale: {args.layers} decoder layer(s), {args.vision_layers} vision layer(s), {args.pairs} counting/image"
          f" pairs, k={args.steps}, {args.repeats} repeat(s), {args.threads} thread(s), {args.dtype} on {args.device},"
          f" {args.jobs} child(ren) at once"
          + (", QUICK (1/16 widths)" if args.quick else ", real widths"))
    report = {"args": vars(args), "models": {}}
    projections = {}
    for name in args.models:
        results = run_steps(args, name)
        print_table(name, results, args.device == "cuda")
        projections[name] = project(name, results, args)
        report["models"][name] = {"dims": dims(name, args.quick), "steps": results, "projection": projections[name]}
    print_projection(projections, args)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
