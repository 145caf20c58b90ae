"""The embedded default model ("toy"): a small LLaVA trained from scratch on the five tasks.

`load_model("toy")` loads `toy_path()` through the same adapter path as a hub checkpoint
(AutoConfig -> LlavaForConditionalGeneration, AutoProcessor -> LlavaProcessor with the PIL image
processor). The weights are produced by `python experiments/train_toy_vlm.py`; this module also
holds what that script needs: the word-level tokenizer with its chat template, the config, the
builder of the untrained model + processor, and the accuracy measure shared with the report and
the tests (argmax of the next-token logits at the last position == the answer's first token).
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
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .tasks import vocabulary

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", *SPECIAL_TOKENS])
    words = sorted({*vocabulary(), *TEMPLATE_WORDS, *"0123456789", *"?.,:!-+*/"})
    tok.train_from_iterator(words, trainer)
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=_CHAT_TEMPLATE, additional_special_tokens=["<image>"], padding_side="left",
    )


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


def accuracy(model, task: str, modality: str, n: int, *, seed: int, batch_size: int = 100) -> list[bool]:
    """Per-prompt correctness on the first prompt of n fresh pairs (`sample_pairs(..., seed=seed)`):
    argmax of the next-token logits at the last position of the chat-templated prompt equals the
    answer's first-token id. Prompts are run in equal-length batches (no padding)."""
    import torch

    from .pairs import answer_token, chat_text, encode
    from .tasks import sample_pairs

    prompts = [p for p, _ in sample_pairs(task, modality, n, seed=seed, image_size=model.image_size)]
    texts = [chat_text(model, p) for p in prompts]
    answers = [answer_token(model, t, p) for t, p in zip(texts, prompts)]
    encoded = [encode(model, [t], [p.image] if p.image is not None else None) for t, p in zip(texts, prompts)]
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e["input_ids"].shape[1], []).append(i)
    correct = [False] * len(prompts)
    hf = model.hf_model
    with torch.no_grad():
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                inputs = {k: torch.cat([encoded[i][k] for i in chunk]).to(model.device) for k in encoded[chunk[0]]}
                pred = hf(**inputs).logits[:, -1].argmax(-1).tolist()
                for i, p in zip(chunk, pred):
                    correct[i] = p == answers[i]
    return correct
