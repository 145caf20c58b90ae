"""Tiny random-weight models of every supported family, built offline: the test zoo.

Each has a word-level tokenizer trained on the fly on the task vocabulary, a chat template
shaped like the real checkpoint's, and a processor built without torchvision; it is wrapped
through the same adapter (`model.wrap`) as a hub model. `TINY` holds one recipe per family
of the adapter table: its chat template and a function building (model, processor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as T

from ..model import ADAPTERS, VLM, wrap
from ..model.adapters import IDEFICS3_TILES
from ..model.processing import MiniProcessor, without_video
from .words import word_tokenizer

IMAGE_SIZE = 64  # tiny models see 64x64 images as 16-pixel patches


@dataclass(frozen=True)
class Template:
    """A chat template shaped like the real checkpoint's: special tokens, the turn around {body}, the image part."""

    specials: tuple[str, ...]
    turn: str
    image: str
    named: tuple[tuple[str, str], ...] = ()  # named special tokens (e.g. Gemma-3's boi/eoi/image tokens)
    words: tuple[str, ...] = ()  # plain words the processor writes (e.g. Aya's tile names)

    def jinja(self) -> str:
        """A jinja chat template for one user turn with optional image and text parts."""
        body = ("{% for c in messages[0]['content'] %}{% if c['type'] == 'image' %}" + self.image
                + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}")
        head, tail = self.turn.split("{body}")
        return head + body + "{% if add_generation_prompt %}" + tail + "{% endif %}"

    def tokenizer(self) -> T.PreTrainedTokenizerFast:
        from ..data.tasks import vocabulary

        extra = self.turn.replace("{body}", " ").split() + ["system", "You", "are", "a", "helpful", "assistant",
                                                             "USER", "ASSISTANT", "user", "model"]
        words = [*vocabulary(), *extra, *self.words, *"0123456789", "?", ".", ",", ":", "!", "-", "+", "*", "/"]
        return word_tokenizer(list(self.specials), words, chat_template=self.jinja(),
                              extra_special_tokens=dict(self.named) or {})


QWEN = Template(("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>"),
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n"
                "<|im_start|>assistant\n", "<|vision_start|><|image_pad|><|vision_end|>")
QWEN3 = Template(QWEN.specials, "<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n", QWEN.image)  # no system turn
LLAVA = Template(("<s>", "</s>", "<image>"), "<s>USER: {body} ASSISTANT:", "<image>\n")
# llava-hf's LLaVA-OneVision template: "<|im_start|>user <image>\n{q}<|im_end|><|im_start|>assistant\n" (no system turn).
LLAVA_ONEVISION = Template(("<|im_start|>", "<|im_end|>", "<image>", "<video>"),
                           "<|im_start|>user {body}<|im_end|><|im_start|>assistant\n", "<image>\n")
MISTRAL = Template(("<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"), "<s>[INST]{body}[/INST]", "[IMG]")
GEMMA = Template(("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>"), "<bos><start_of_turn>user\n{body}<end_of_turn>\n<start_of_turn>model\n",
                 "<start_of_image>", (("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                                      ("image_token", "<image_soft_token>")))
# Gemma 4's image, audio and video tokens, named as its processor reads them (tokenizer.image_token, .boi_token, ...;
# the processor refuses a tokenizer without the audio markers). The real checkpoint's token strings are not verified.
GEMMA4 = Template(("<bos>", "<eos>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>",
                   "<|audio|>", "<|video|>"), "<bos><|turn>user\n{body}<turn|>\n<|turn>model\n", "<|image|>",
                  (("boi_token", "<|image>"), ("eoi_token", "<image|>"), ("image_token", "<|image|>"),
                   ("boa_token", "<|audio>"), ("eoa_token", "<audio|>"), ("audio_token", "<|audio|>")))
# PaliGemma has no chat template (its recipe drops this one): prompts follow the adapter's `prompt_format`, whose
# task prefix the tokenizer learns as words. "\n" is a token of its own, as in the real Gemma tokenizer.
PALIGEMMA = Template(("<bos>", "<eos>", "<image>", "\n"), "{body}", "<image>", words=("answer", "en"))

INTERNVL = Template(("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
                    "<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n", "<IMG_CONTEXT>\n",
                    (("start_image_token", "<img>"), ("end_image_token", "</img>"),
                     ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>")))
# Aya's tile name is plain text: the tiny tokenizer knows it as one word.
AYA = Template(("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"),
               "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>{body}<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<image>", words=("TILE_GLOBAL",))
IDEFICS3 = Template(("<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
                     *IDEFICS3_TILES), "<|im_start|>User:{body}<end_of_utterance>\nAssistant:", "<image>")
GLM = Template(("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|image|>", "<|end_of_image|>",
                "<|begin_of_video|>", "<|video|>", "<|end_of_video|>", "<think>", "</think>", "<answer>", "</answer>"),
               "[gMASK]<sop><|user|>\n{body}<|assistant|>\n", "<|begin_of_image|><|image|><|end_of_image|>")


#: A 1-layer vision tower of width 32 seeing 64 px images in 16 px patches.
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE,
              patch_size=16)


def _text(cls, tok, **kw):
    """A 2-layer decoder config: width 32, 4 heads of 8 (2 KV heads), 48 neurons."""
    dims = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                bos_token_id=None, eos_token_id=None)
    return cls(**{**dims, **kw})


def _pixtral_vision():
    return T.PixtralVisionConfig(**_TOWER, head_dim=16)


_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
_QWEN_PIXELS = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}


def _qwen_ids(cfg, tok):
    cfg.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    cfg.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
    cfg.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_end|>")
    ip = T.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, size=_QWEN_PIXELS)
    return ip


def _qwen2_vl(tok):
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=16)
    cfg = T.Qwen2VLConfig(text_config=_text(T.Qwen2VLTextConfig, tok, rope_parameters=_MROPE).to_dict(), vision_config=vision)
    ip = _qwen_ids(cfg, tok)
    return T.Qwen2VLForConditionalGeneration(cfg), MiniProcessor(tok, ip, ADAPTERS["qwen2_vl"], merge=2, patch=16)


def _qwen2_5_vl(tok):
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                  window_size=32, fullatt_block_indexes=[1])
    cfg = T.Qwen2_5_VLConfig(text_config=_text(T.Qwen2_5_VLTextConfig, tok, rope_parameters=_MROPE).to_dict(),
                             vision_config=vision)
    ip = _qwen_ids(cfg, tok)
    return T.Qwen2_5_VLForConditionalGeneration(cfg), MiniProcessor(tok, ip, ADAPTERS["qwen2_5_vl"], merge=2, patch=16)


def _qwen3_vl(tok):
    """DeepStack from both vision layers into decoder layers 0 and 1."""
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    rope = {**_MROPE, "mrope_interleaved": True}
    text = _text(T.Qwen3VLTextConfig, tok, rope_parameters=rope, num_hidden_layers=3)  # a layer above the injections
    cfg = T.Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision)
    ip = _qwen_ids(cfg, tok)
    return T.Qwen3VLForConditionalGeneration(cfg), MiniProcessor(tok, ip, ADAPTERS["qwen3_vl"], merge=2, patch=16)


def _qwen3_5(tok):
    """Qwen3.5's layer pattern (linear, linear, linear, full): 4 full-attention heads of 8 (gated), 6 linear value heads
    of 4 over 2 key heads of 8: layers with different head counts and widths."""
    vision = dict(depth=1, hidden_size=32, out_hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                  num_position_embeddings=64)
    rope = {**_MROPE, "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    text = _text(T.Qwen3_5TextConfig, tok, rope_parameters=rope, num_hidden_layers=4, linear_num_key_heads=2,
                 linear_key_head_dim=8, linear_num_value_heads=6, linear_value_head_dim=4, linear_conv_kernel_dim=2)
    cfg = T.Qwen3_5Config(text_config=text.to_dict(), vision_config=vision)
    ip = _qwen_ids(cfg, tok)
    return T.Qwen3_5ForConditionalGeneration(cfg), MiniProcessor(tok, ip, ADAPTERS["qwen3_5"], merge=2, patch=16)


def _qwen3_vl_moe(tok):
    """Qwen3-VL-30B-A3B's layout: every layer sparse, 4 experts of 12 neurons, top-2 (renormalised); DeepStack into
    layers 0 and 1. Eager experts (the default grouped_mm has no float64 kernel; the neuron site replaces it anyway)."""
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    rope = {**_MROPE, "mrope_interleaved": True}
    text = _text(T.Qwen3VLMoeTextConfig, tok, rope_parameters=rope, num_hidden_layers=3, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=12)
    cfg = T.Qwen3VLMoeConfig(text_config=text.to_dict(), vision_config=vision)
    ip = _qwen_ids(cfg, tok)
    model = T.Qwen3VLMoeForConditionalGeneration(cfg)
    return model, MiniProcessor(tok, ip, ADAPTERS["qwen3_vl_moe"], merge=2, patch=16)


def _llava(tok):
    vision = T.CLIPVisionConfig(**_TOWER, projection_dim=32)
    cfg = T.LlavaConfig(text_config=_text(T.LlamaConfig, tok), vision_config=vision,
                        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                        vision_feature_select_strategy="default")
    ip = T.LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                            image_token="<image>", num_additional_image_tokens=1, chat_template=tok.chat_template)
    return T.LlavaForConditionalGeneration(cfg), proc


def _llava_onevision(tok):
    """Anyres at 64 px: 4x4 base patches + one 64 px crop of 4 rows of 4 + a newline = 36 image tokens."""
    pins = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
            [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
    vision = T.SiglipVisionConfig(**_TOWER, vision_use_head=False)
    cfg = T.LlavaOnevisionConfig(text_config=_text(T.Qwen2Config, tok), vision_config=vision,
                                 image_token_index=tok.convert_tokens_to_ids("<image>"),
                                 video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pins,
                                 vision_feature_select_strategy="full", vision_feature_layer=-1)
    ip = T.LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=pins)
    proc = without_video(T.LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, num_image_tokens=16,
                                                    vision_feature_select_strategy="full",
                                                    chat_template=tok.chat_template)
    return T.LlavaOnevisionForConditionalGeneration(cfg), proc


def _internvl(tok):
    """One 64 px tile of 16 px patches, pixel-shuffled 2x2: 4 <IMG_CONTEXT>."""
    vision = T.InternVLVisionConfig(**_TOWER)
    cfg = T.InternVLConfig(text_config=_text(T.Qwen2Config, tok), vision_config=vision, image_seq_length=4,
                           image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                           vision_feature_layer=-1)
    ip = T.GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True)
    proc = without_video(T.InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                              chat_template=tok.chat_template)
    return T.InternVLForConditionalGeneration(cfg), proc


def _idefics3(tok):
    """A 64 px image as 2x2 tiles of 64 px plus the global view, each 16 px patches shuffled 2x2: 5 x 4 <image>."""
    vision = T.Idefics3VisionConfig(**_TOWER)
    cfg = T.Idefics3Config(text_config=_text(T.LlamaConfig, tok), vision_config=vision, scale_factor=2,
                           image_token_id=tok.convert_tokens_to_ids("<image>"))
    ip = T.Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE})
    proc = T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    return T.Idefics3ForConditionalGeneration(cfg), proc


def _aya_vision(tok):
    """One 64 px tile, pixel-shuffled 2x2: 4 <|IMG_PATCH|>; Cohere-2 text model (parallel attention and MLP)."""
    text = _text(T.Cohere2Config, tok, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    vision = T.SiglipVisionConfig(**_TOWER, vision_use_head=False)
    cfg = T.AyaVisionConfig(text_config=text, vision_config=vision, downsample_factor=2,
                            image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
                            vision_feature_select_strategy="full", vision_feature_layer=-1)
    ip = T.GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True)
    proc = T.AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=16, img_size=IMAGE_SIZE, downsample_factor=2,
                                chat_template=tok.chat_template)
    return T.AyaVisionForConditionalGeneration(cfg), proc


def _glm(tok, text, classes: tuple, **vision):
    """A GLM-4.1V-style model around a text config: classes = (config, PIL image processor, processor, model);
    2x2 merged 16 px patches: 4 <|image|>."""
    config, image_processor, processor, model = classes
    ids = tok.convert_tokens_to_ids
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, image_size=IMAGE_SIZE, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, **vision)
    cfg = config(text_config=text.to_dict(), vision_config=vision, image_token_id=ids("<|image|>"),
                 video_token_id=ids("<|video|>"), image_start_token_id=ids("<|begin_of_image|>"),
                 image_end_token_id=ids("<|end_of_image|>"), video_start_token_id=ids("<|begin_of_video|>"),
                 video_end_token_id=ids("<|end_of_video|>"))
    # GLM's image processor counts the temporal patch (2 frames) against longest_edge
    ip = image_processor(patch_size=16, merge_size=2, temporal_patch_size=2,
                         size={"shortest_edge": IMAGE_SIZE**2, "longest_edge": 2 * IMAGE_SIZE**2})
    proc = without_video(processor)(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    return model(cfg), proc


def _glm4v(tok):
    """2 heads of 16 (half of each rotary), 3-D rotary positions."""
    text = _text(T.Glm4vTextConfig, tok, num_attention_heads=2, num_key_value_heads=1, head_dim=None,
                 rope_parameters={**_MROPE, "partial_rotary_factor": 0.5})
    return _glm(tok, text, (T.Glm4vConfig, T.Glm4vImageProcessorPil, T.Glm4vProcessor, T.Glm4vForConditionalGeneration))


def _glm46v(tok):
    """GLM-4.6V's MoE text model (glm4v_moe_text): layer 0 dense (48 neurons), layers 1-2 with 4 routed experts of 12
    neurons (top-2, sigmoid router) and a shared expert of 12; 2 heads of 16."""
    text = _text(T.Glm4vMoeTextConfig, tok, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, rope_parameters={**_MROPE, "partial_rotary_factor": 0.5}, n_routed_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=12, n_shared_experts=1, first_k_dense_replace=1)
    return _glm(tok, text, (T.Glm46VConfig, T.Glm46VImageProcessorPil, T.Glm46VProcessor,
                            T.Glm46VForConditionalGeneration), model_type="glm4v_vision")


def _pixtral_ip():
    return T.PixtralImageProcessorPil(size={"longest_edge": IMAGE_SIZE}, patch_size={"height": 16, "width": 16})


def _pixtral(tok):
    cfg = T.LlavaConfig(text_config=_text(T.MistralConfig, tok), vision_config=_pixtral_vision(),
                        image_token_id=tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1,
                        vision_feature_select_strategy="full")
    return T.LlavaForConditionalGeneration(cfg), MiniProcessor(tok, _pixtral_ip(), ADAPTERS["pixtral"], merge=1, patch=16)


def _mistral3(tok):
    cfg = T.Mistral3Config(text_config=_text(T.MistralConfig, tok), vision_config=_pixtral_vision(),
                           image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                           vision_feature_layer=-1)
    return T.Mistral3ForConditionalGeneration(cfg), MiniProcessor(tok, _pixtral_ip(), ADAPTERS["mistral3"], merge=2, patch=16)


def _gemma3(tok):
    text = _text(T.Gemma3TextConfig, tok, sliding_window=64, query_pre_attn_scalar=8)
    vision = T.SiglipVisionConfig(**_TOWER)
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=tok.image_token_id,
                         boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id)
    ip = T.Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
    return T.Gemma3ForConditionalGeneration(cfg), proc


def _gemma4(tok):
    """Gemma 4's MoE text model: layers (sliding, full, sliding, full), 4 heads of 8 on sliding layers and of 16
    on full ones (per-layer config), full layers' keys as values (1 KV head), the last two layers reusing the first
    two's keys and values with a double-wide MLP (96 neurons, 48 elsewhere), beside it in every layer 4 experts of
    12 neurons, top-2 (site: 48 expert neurons, then the dense MLP's); per-layer embeddings of width 8; image
    tokens attend both ways. q_norm's weights are 1/sqrt(head width): at transformers' init of 1 the unscaled
    attention logits make the random model so sharp that IG tracks single-node patching well below r = 0.8. The real image processor and processor (without video and audio): a 64 px image is
    resized to 96 px, 4 px patches pooled 3x3: 64 image tokens."""
    ids = tok.convert_tokens_to_ids
    ip = T.Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    proc = without_video(T.Gemma4Processor)(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template,
                                            image_seq_length=64)
    text = _text(T.Gemma4TextConfig, tok, num_hidden_layers=4, global_head_dim=16, sliding_window=64,
                 layer_types=["sliding_attention", "full_attention"] * 2, attention_k_eq_v=True,
                 num_global_key_value_heads=1, num_kv_shared_layers=2, use_double_wide_mlp=True,
                 vocab_size_per_layer_input=len(tok), hidden_size_per_layer_input=8,
                 use_bidirectional_attention="vision", enable_moe_block=True, num_experts=4, top_k_experts=2,
                 moe_intermediate_size=12)
    vision = T.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                                  position_embedding_size=32)
    cfg = T.Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=None,
                         image_token_id=ids("<|image|>"), boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"),
                         video_token_id=ids("<|video|>"), audio_token_id=ids("<|audio|>"),
                         boa_token_id=ids("<|audio>"), eoa_token_index=ids("<audio|>"))
    model = T.Gemma4ForConditionalGeneration(cfg)
    for layer in model.model.language_model.layers:  # Gemma 4 attends with scaling 1 and learns the temperature in
        layer.self_attn.q_norm.weight.data.fill_(layer.self_attn.head_dim ** -0.5)  # q_norm: 1/sqrt(d) here
    return model, proc


def _paligemma(tok):
    """16 SigLIP patches of 16 px (no merge), Gemma-2 text model; the real processor, no chat template."""
    tok.chat_template, tok.bos_token, tok.eos_token = None, "<bos>", "<eos>"
    ip = T.SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    ip.image_seq_length = (IMAGE_SIZE // 16) ** 2  # the hub's preprocessor config carries it (1024 at 448 px)
    proc = T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds 1152 <locXXXX>/<segXXX> tokens: build first
    text = _text(T.Gemma2Config, tok, sliding_window=64, query_pre_attn_scalar=8)  # vocabulary: len(tok) after them
    vision = T.SiglipVisionConfig(**_TOWER, projection_dim=32)
    cfg = T.PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=32,
                            image_token_index=tok.convert_tokens_to_ids("<image>"))
    return T.PaliGemmaForConditionalGeneration(cfg), proc


@dataclass(frozen=True)
class Tiny:
    """How to build a tiny model of one family: its chat template and (tokenizer) -> (model, processor)."""

    template: Template
    build: Callable


#: One tiny recipe per adapter row.
TINY: dict[str, Tiny] = {
    "qwen2_vl": Tiny(QWEN, _qwen2_vl),
    "qwen2_5_vl": Tiny(QWEN, _qwen2_5_vl),
    "qwen3_vl": Tiny(QWEN3, _qwen3_vl),
    "qwen3_5": Tiny(QWEN3, _qwen3_5),
    "qwen3_vl_moe": Tiny(QWEN3, _qwen3_vl_moe),
    "llava": Tiny(LLAVA, _llava),
    "llava_onevision": Tiny(LLAVA_ONEVISION, _llava_onevision),
    "internvl": Tiny(INTERNVL, _internvl),
    "pixtral": Tiny(MISTRAL, _pixtral),
    "mistral3": Tiny(MISTRAL, _mistral3),
    "gemma3": Tiny(GEMMA, _gemma3),
    "gemma4": Tiny(GEMMA4, _gemma4),
    "idefics3": Tiny(IDEFICS3, _idefics3),
    "paligemma": Tiny(PALIGEMMA, _paligemma),
    "aya_vision": Tiny(AYA, _aya_vision),
    "glm4v": Tiny(GLM, _glm4v),
    "glm46v": Tiny(GLM, _glm46v),
}
FAMILIES = tuple(TINY)


def tiny_model(family: str, *, seed: int = 0) -> VLM:
    """A tiny random-weight model of `family` (one of FAMILIES), wrapped like a hub model."""
    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    recipe = TINY[family]
    model, processor = recipe.build(recipe.template.tokenizer())
    for param in model.parameters():  # some inits zero a matrix (Gemma-3's projector): no signal would pass
        if param.ndim >= 2 and not param.any():
            torch.nn.init.normal_(param, std=param.shape[0] ** -0.5)
    return wrap(model.float(), processor, name=f"tiny-{family}", image_size=IMAGE_SIZE, wording="toy")
