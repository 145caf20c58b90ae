"""Processors: the checkpoint's own where it can be built, else without its video part, else a small torchvision-free one.

transformers' Qwen2-VL and Pixtral processors need torchvision. `MiniProcessor`
does what they do for single-image prompts with PIL image processors: run the
image processor, expand the image placeholder into the right number of image
tokens, and add `mm_token_type_ids` where the family's rotary positions need them.
What each family needs is read from its adapter row (`pil_image_processor`,
`image_expansion`, `mm_token_type_ids`).
"""
from __future__ import annotations

import torch
from transformers import BatchFeature


class MiniProcessor:
    """Tokenizer + PIL image processor + the family's image-token expansion."""

    def __init__(self, tokenizer, image_processor, adapter, *, merge: int = 1, patch: int = 16):
        self.tokenizer, self.image_processor, self.adapter = tokenizer, image_processor, adapter
        self.merge, self.patch = merge, patch

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def _expand(self, image_inputs, i: int) -> str:
        """The token string image i expands into (`Adapter.image_expansion`): grid pads, or rows closed by break/end tokens."""
        image = self.adapter.image_placeholder
        if self.adapter.image_expansion == "grid":
            return image * (int(image_inputs["image_grid_thw"][i].prod()) // self.merge**2)
        h, w = (int(s) // (self.patch * self.merge) for s in image_inputs["image_sizes"][i])
        row_break, end = self.adapter.extra_image_tokens
        return (row_break.join([image * w] * h)) + end

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs):
        text = [text] if isinstance(text, str) else list(text)
        placeholder = self.adapter.image_placeholder
        data = {}
        if images:
            images = [im for group in images for im in (group if isinstance(group, (list, tuple)) else [group])]
            image_inputs = self.image_processor(images=images, return_tensors="pt")
            data.update(image_inputs)
            n_placeholders = sum(t.count(placeholder) for t in text)
            if n_placeholders != len(images):
                raise ValueError(f"{len(images)} images but {n_placeholders} image placeholders in the text")
            i = 0
            for j, t in enumerate(text):
                parts = t.split(placeholder)
                text[j] = parts[0] + "".join(self._expand(image_inputs, i + k) + p for k, p in enumerate(parts[1:]))
                i += len(parts) - 1
        enc = self.tokenizer(text, return_tensors=return_tensors, **kwargs)
        data.update(enc)
        if self.adapter.mm_token_type_ids:  # multimodal rotary positions need to know the image tokens
            image_id = self.tokenizer.convert_tokens_to_ids(placeholder)
            data["mm_token_type_ids"] = (enc["input_ids"] == image_id).to(torch.int32)
        return BatchFeature(data)


#: The processor parts `without_video` leaves out: every video processor needs torchvision, and no prompt has audio.
LEFT_OUT = ("video_processor", "feature_extractor")
#: The parts it keeps, in the order transformers hands them over positionally (`ProcessorMixin.from_pretrained`).
KEPT = ("image_processor", "tokenizer")


def without_video(cls):
    """The transformers processor class `cls` without its video processor (every video processor needs torchvision)
    and audio feature extractor (Gemma 4's).

    Its image processor and tokenizer are built as usual (`from_pretrained` too); only videos (and audio) are refused.
    A class whose constructor names the parts left out gets None for them, and they are not handed on to
    `ProcessorMixin`, which builds the parts `get_attributes` lists (checked against transformers 5.24)."""
    import inspect

    from transformers import ProcessorMixin

    named = [part for part in LEFT_OUT if part in inspect.signature(cls.__init__).parameters]

    class Parts(ProcessorMixin):  # after `cls` in the method order: drops the parts left out
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{k: v for k, v in kwargs.items() if k not in named})

    def init(self, *args, **kwargs):
        kwargs.update(zip(KEPT, args))  # positional parts arrive in KEPT's order, whatever cls's own order is
        cls.__init__(self, **{part: None for part in named}, **kwargs)

    return type(cls.__name__, (cls, Parts), {"get_attributes": classmethod(lambda _: list(KEPT)), "__init__": init})


def load_processor(path: str, adapter):
    """The checkpoint's processor, else its class without video (`Adapter.processor`), else a MiniProcessor."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path)
    except (ImportError, ValueError, TypeError, OSError, AttributeError) as err:
        if adapter.processor is not None:
            print(f"note: building {adapter.processor} without its video processor ({err.__class__.__name__}: {err})")
            return without_video(getattr(transformers, adapter.processor)).from_pretrained(path)
        if adapter.pil_image_processor is None:
            raise
        config = transformers.AutoConfig.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        image_processor = getattr(transformers, adapter.pil_image_processor).from_pretrained(path)
        vc = config.vision_config
        merge = getattr(vc, "spatial_merge_size", None) or getattr(config, "spatial_merge_size", 1)
        print(f"note: using modality_circuits' torchvision-free processor ({err.__class__.__name__}: {err})")
        return MiniProcessor(tokenizer, image_processor, adapter, merge=merge, patch=vc.patch_size)
