"""Tiny random-weight models of every supported family, built offline.

Each has a word-level tokenizer trained on the fly on the task vocabulary, a chat
template shaped like the real checkpoint's, and a torchvision-free processor; it
is loaded through the same adapter (`models.wrap`) as a hub model.
"""
from __future__ import annotations

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from .models import ADAPTERS, VLM, wrap
from .processing import MiniProcessor

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "pixtral", "mistral3", "gemma3")

IMAGE_SIZE = 64  # tiny models see 64x64 images as 16-pixel patches

# Chat templates shaped like the real ones: (special tokens, template with {image} where the image goes).
_TEMPLATES = {
    "qwen": (
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>"],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n",
        "<|vision_start|><|image_pad|><|vision_end|>",
    ),
    "llava": (["<s>", "</s>", "<image>"], "<s>USER: {body} ASSISTANT:", "<image>\n"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"], "<s>[INST]{body}[/INST]", "[IMG]"),
    "gemma": (
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        "<bos><start_of_turn>user\n{body}<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_image>",
    ),
}
_STYLE = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "llava": "llava", "pixtral": "mistral", "mistral3": "mistral", "gemma3": "gemma"}


def _jinja(template: str, image: str) -> str:
    """A jinja chat template for one user turn with optional image and text parts."""
    body = "{% for c in messages[0]['content'] %}{% if c['type'] == 'image' %}" + image + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    head, tail = template.split("{body}")
    return head + body + "{% if add_generation_prompt %}" + tail + "{% endif %}"


def word_tokenizer(specials: list[str], extra_words=(), chat_template: str | None = None,
                   named: dict | None = None) -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer (digits split one per token) trained on the task vocabulary."""
    from .tasks import vocabulary

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", *specials])
    words = [*vocabulary(), *extra_words, *"0123456789", "?", ".", ",", ":", "!", "-", "+", "*", "/"]
    tok.train_from_iterator(words, trainer)
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", chat_template=chat_template,
        additional_special_tokens=specials, extra_special_tokens=named or {},
    )


def _tokenizer(family: str) -> T.PreTrainedTokenizerFast:
    specials, template, image = _TEMPLATES[_STYLE[family]]
    extra = template.replace("{body}", " ").split() + ["system", "You", "are", "a", "helpful", "assistant", "USER", "ASSISTANT", "user", "model"]
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    return word_tokenizer(specials, extra, _jinja(template, image), named if family == "gemma3" else None)


def _text_config(cls, tok, **kw):
    dims = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=None, eos_token_id=None,
    )
    return cls(**{**dims, **kw})


def _vision_pixtral():
    return T.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=16, patch_size=16, image_size=IMAGE_SIZE)


def _build(family: str, tok):
    """(transformers model, processor) of one tiny family."""
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        if family == "qwen2_vl":
            text = _text_config(T.Qwen2VLTextConfig, tok, rope_parameters=rope)
            vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=16)
            cfg = T.Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision)
            model = T.Qwen2VLForConditionalGeneration
        else:
            text = _text_config(T.Qwen2_5_VLTextConfig, tok, rope_parameters=rope)
            vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                          window_size=32, fullatt_block_indexes=[1])
            cfg = T.Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vision)
            model = T.Qwen2_5_VLForConditionalGeneration
        cfg.image_token_id = ids("<|image_pad|>")
        cfg.vision_start_token_id, cfg.vision_end_token_id = ids("<|vision_start|>"), ids("<|vision_end|>")
        size = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}
        ip = T.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, size=size)
        return model(cfg), MiniProcessor(tok, ip, ADAPTERS[family], merge=2, patch=16)
    if family == "llava":
        vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=IMAGE_SIZE, patch_size=16, projection_dim=32)
        cfg = T.LlavaConfig(text_config=_text_config(T.LlamaConfig, tok), vision_config=vision, image_token_id=ids("<image>"),
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
        ip = T.LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                                image_token="<image>", num_additional_image_tokens=1, chat_template=tok.chat_template)
        return T.LlavaForConditionalGeneration(cfg), proc
    if family in ("pixtral", "mistral3"):
        ip = T.PixtralImageProcessorPil(size={"longest_edge": IMAGE_SIZE}, patch_size={"height": 16, "width": 16})
        text = _text_config(T.MistralConfig, tok)
        if family == "pixtral":
            cfg = T.LlavaConfig(text_config=text, vision_config=_vision_pixtral(), image_token_id=ids("[IMG]"),
                                vision_feature_layer=-1, vision_feature_select_strategy="full")
            return T.LlavaForConditionalGeneration(cfg), MiniProcessor(tok, ip, ADAPTERS[family], merge=1, patch=16)
        cfg = T.Mistral3Config(text_config=text, vision_config=_vision_pixtral(), image_token_index=ids("[IMG]"),
                               spatial_merge_size=2, vision_feature_layer=-1)
        return T.Mistral3ForConditionalGeneration(cfg), MiniProcessor(tok, ip, ADAPTERS[family], merge=2, patch=16)
    if family == "gemma3":
        text = _text_config(T.Gemma3TextConfig, tok, sliding_window=64, query_pre_attn_scalar=8)
        vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=IMAGE_SIZE, patch_size=16)
        cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=tok.image_token_id,
                             boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id)
        ip = T.Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
        return T.Gemma3ForConditionalGeneration(cfg), proc
    raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")


def tiny_model(family: str, *, seed: int = 0) -> VLM:
    """A tiny random-weight model of `family` (one of FAMILIES), wrapped like a hub model."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    tok = _tokenizer(family)
    model, processor = _build(family, tok)
    for param in model.parameters():  # some inits zero a matrix (Gemma-3's projector): no signal would pass
        if param.ndim >= 2 and not param.any():
            torch.nn.init.normal_(param, std=param.shape[0] ** -0.5)
    return wrap(model.float(), processor, name=f"tiny-{family}", image_size=IMAGE_SIZE)
