"""The embedded default model ("toy"): a small LLaVA trained from scratch on the five tasks.

`load_model("toy")` loads `toy_path()` through the same adapter path as a hub checkpoint
(AutoConfig -> LlavaForConditionalGeneration, AutoProcessor -> LlavaProcessor with the PIL image
processor). The weights are produced by `python experiments/train_toy_vlm.py`; this module also
holds what that script needs: the word-level tokenizer with its chat template, the config and the
builder of the untrained model + processor.
"""
from __future__ import annotations

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent / "toy_vlm"
IMAGE_SIZE = 64  # 4x4 grid of 16-pixel cells: one drawn object per patch
PATCH_SIZE = 16
TRAIN_COMMAND = "python experiments/train_toy_vlm.py"

# LLaVA-1.5-style chat template: "<s>USER: <image>\n{query} ASSISTANT:"
SPECIAL_TOKENS = ["<s>", "</s>", "<image>"]
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":"]
_CHAT_TEMPLATE = (
    "<s>USER: {% for c in messages[0]['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def toy_path() -> str:
    """Folder of the trained toy VLM; FileNotFoundError if its weights are missing."""
    if not (TOY_DIR / "model.safetensors").is_file() or not (TOY_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the toy VLM weights are missing from {TOY_DIR}; train them with `{TRAIN_COMMAND}` "
            "(about an hour on 2 CPU cores)"
        )
    return str(TOY_DIR)


def toy_tokenizer():
    """Word-level tokenizer (digits one per token) over the task vocabulary, with the chat template."""
    from ..data.tasks import vocabulary
    from .words import word_tokenizer

    words = sorted({*vocabulary(), *TEMPLATE_WORDS, *"0123456789", *"?.,:!-+*/"})
    return word_tokenizer(SPECIAL_TOKENS, words, additional=["<image>"], bos_token="<s>", eos_token="</s>",
                          chat_template=_CHAT_TEMPLATE, padding_side="left")


def toy_image_processor():
    """PIL (torchvision-free) LLaVA image processor; the white background maps to 0."""
    import transformers as T

    return T.LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[1.0, 1.0, 1.0], image_std=[0.5, 0.5, 0.5],
    )


def toy_processor(tokenizer=None):
    import transformers as T

    tokenizer = tokenizer or toy_tokenizer()
    return T.LlavaProcessor(
        image_processor=toy_image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def toy_config(tokenizer=None, *, hidden: int = 192, layers: int = 4, heads: int = 8, intermediate: int = 768,
               vision_hidden: int = 128, vision_layers: int = 3, vision_heads: int = 4,
               vision_intermediate: int = 512, rope_theta: float = 20.0):
    """LlavaConfig: CLIP vision tower (16-pixel patches on 64x64 images) + Llama decoder."""
    import transformers as T

    tok = tokenizer or toy_tokenizer()
    text = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        pad_token_id=tok.pad_token_id, bos_token_id=tok.convert_tokens_to_ids("<s>"),
        eos_token_id=tok.convert_tokens_to_ids("</s>"), tie_word_embeddings=True,
    )
    vision = T.CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_intermediate, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    return T.LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=True,
    )


def build_toy(seed: int = 0, **config_kwargs):
    """(untrained LlavaForConditionalGeneration, LlavaProcessor) of the toy architecture."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    tok = toy_tokenizer()
    model = T.LlavaForConditionalGeneration(toy_config(tok, **config_kwargs)).float()
    return model, toy_processor(tok)
