"""The one table of model-family facts.

Everything an algorithm, an analysis or the processor needs to know about a family (where
the decoder layers live, which modules hold heads and neurons, which tokens an image becomes,
how its processor expands an image, what image size it sees) is a field of `Adapter`, and
`ADAPTERS` holds one row per family. No other module of the package names a family; the test
zoo (`modality_circuits.zoo.tiny`) holds one tiny configuration per row.

Adding a family: one row here, one tiny config in zoo/tiny.py (docs/models.md, "Adding a model family").
"""
from __future__ import annotations

from dataclasses import dataclass

#: The values each kind-naming string field of `Adapter` takes (described at the field); any other is refused when
#: a row is built, so a typo is an error rather than the default behaviour.
KINDS = {
    "patch_grid": ("square", "thw", "rows", "base_rows", "frames"),
    "attention": ("causal", "image_blocks", "prefix"),
    "image_expansion": (None, "grid", "rows"),
}


@dataclass(frozen=True)
class Adapter:
    """Model-family facts. Module paths are relative to the transformers model (or its nnsight envoy)."""

    family: str
    model_class: str  # transformers class that loads the checkpoint
    layers: str = "model.language_model.layers"  # the decoder layers
    text_config: str = "text_config"  # where the decoder's sizes live in the config
    head_site: str = "self_attn.o_proj"  # its INPUT is the per-head outputs, (batch, pos, heads*head_dim)
    neuron_site: str = "mlp.down_proj"  # its INPUT is the MLP neurons, (batch, pos, d_mlp)
    # Layers of other kinds (text config `layer_types`): (layer type, head site, config field of its head count,
    # config field of its head width). Layers of a type not listed use head_site, num_attention_heads, head_dim;
    # a type neither listed nor in ATTENTION_TYPES is refused (docs/families-2026.md).
    layer_heads: tuple[tuple[str, str, str, str], ...] = ()
    # The fused experts module of a sparse layer (e.g. "mlp.experts"): its neurons are the input of the child
    # `neurons` that model/experts.py installs, unit e*I + j (expert-major); layers without it use neuron_site.
    experts: str | None = None
    layer_returns_tuple: bool = False  # a decoder layer's output is (hidden, ...) rather than hidden
    image_placeholder: str = "<image>"  # what the chat template writes for an image
    extra_image_tokens: tuple[str, ...] = ()  # tokens the image expands into besides the image token (part of D)
    image_text: tuple[str, ...] = ()  # plain text the processor writes inside the image block (tile names): part of D
    answer_prefix: str = ""  # written after the generation prompt so that the next token is the answer (a prefill)
    # Where transformers' processor needs torchvision (model/processing.py): its class, built without the video
    # processor, or else the torchvision-free MiniProcessor with these three fields:
    processor: str | None = None
    pil_image_processor: str | None = None  # transformers' PIL image processor class
    image_expansion: str | None = None  # "grid": placeholder x (patch grid / merge^2); "rows": rows closed by breaks
    mm_token_type_ids: bool = False  # the forward needs mm_token_type_ids (1 at image tokens) for its rotary positions
    # How the image tokens tile the image, row-major (data/pairs.py `patch_grid`): "square" (n tokens in a
    # sqrt(n) x sqrt(n) grid), "thw" (the grid of the processor's image_grid_thw, shrunk by the merge size), or
    # "rows" (rows closed by extra_image_tokens: a row break, and an end marker after the last row), or
    # "base_rows" (anyres: a square base image, then the high-res crops as rows each closed by a learned newline
    # vector at an image-token position; all of them the same image token id: LLaVA-OneVision). For
    # "base_rows" the grid is the base image's; the high-res tokens are named apart (data/pairs.py `token_labels`).
    # "frames": equal runs of image tokens, one per tile and the global view last (Idefics3); the grid is the
    # global view's.
    patch_grid: str = "square"
    # The processor tiles images (anyres crops): the token layout depends on the image size, so pairs are built
    # only at the model's one image size (`VLM.image_size`) and images of any other size are refused.
    tiles: bool = False
    # Processor outputs read only by the vision tower: a forward whose decoder input is given
    # (merged embeddings computed once per prompt) leaves them out; the rest (e.g. Qwen's
    # image_grid_thw for rotary positions, Gemma-3's token_type_ids for its attention mask) stay.
    vision_inputs: tuple[str, ...] = ("pixel_values",)
    # Side of the square images rendered for this family; None: the vision tower's own image size
    # capped at MAX_IMAGE_SIZE (a tower without one gets FALLBACK_IMAGE_SIZE).
    image_size: int | None = None
    # Visual features the decoder stack adds to the residual stream after its first layers (Qwen3-VL's
    # DeepStack): (keyword of the stack's forward holding one (image tokens in the batch, d) tensor per
    # layer from layer 0, keyword holding the (batch, pos) image mask). Empty: image features enter only
    # at the decoder input. Algorithms add them back explicitly (docs/method.md section 13).
    injections: tuple[str, ...] = ()
    # Keyword of the decoder stack's forward holding a per-token input besides its embeddings, (batch, pos, ...):
    # Gemma 4's per-layer embeddings ("per_layer_inputs", looked up from the token ids; the stack adds a projection
    # of its inputs_embeds and hands each layer its slice). It differs between p and p'. Forwards that start from
    # given decoder inputs hand the stack e as inputs_embeds and this input of the row's own prompt; integrated
    # gradients move it along the same straight line as e (docs/method.md section 13). None: no such input.
    token_inputs: str | None = None
    # The decoder's attention over the prompt: "causal"; "image_blocks" (causal, but the tokens of one image
    # see each other both ways: Gemma-3); "prefix" (prefix-LM: the whole prompt, image and question, attends
    # both ways, so the data positions see the question: PaliGemma). docs/method.md section 13.
    attention: str = "causal"
    # How a prompt is written when the checkpoint has no chat template (data/pairs.py `chat_text`): the text the
    # model reads, "{image}" where the image placeholder goes (nothing for a text prompt), "{text}" the user's text.
    # None: the chat template. PaliGemma's mix checkpoints are prompted by task prefix ("answer en {question}").
    prompt_format: str | None = None
    # What the processor writes itself into an image prompt (data/pairs.py `encode`): (after the last image
    # placeholder, at the end). `encode` hands it the prompt without them, so that the model reads `chat_text`.
    processor_adds: tuple[str, str] = ("", "")

    def __post_init__(self):
        for field, allowed in KINDS.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"adapter {self.family!r}: {field}={getattr(self, field)!r} is not one of "
                                 f"{', '.join(repr(v) for v in allowed)}")


#: Layer types whose heads are self-attention heads at `Adapter.head_site` (any family).
ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")

#: Rendered images are at most this many pixels wide: Pixtral's native 1024 px would be 4,096 image tokens.
MAX_IMAGE_SIZE = 512
#: A tower with no fixed input size in its config and no study size: 448 px.
FALLBACK_IMAGE_SIZE = 448
#: The study's image side (docs/method.md section 1: 252x252 images): Qwen2-VL -> 81 image tokens (14 px
#: patches, 2x2 merge), Pixtral -> 16x16 [IMG] + 15 [IMG_BREAK] + [IMG_END] = 272 tokens.
STUDY_IMAGE_SIZE = 252
#: Gemma-3's processor resizes every image to 896x896 (256 image tokens): render at that size, not upsample.
GEMMA3_IMAGE_SIZE = 896
#: Gemma 4's processor resizes a square image to the largest side whose 16 px patches, pooled 3x3, fit its 280
#: soft tokens: 768 px (48x48 patches, 16x16 = 256 image tokens). Rendered at that size, not upsampled.
GEMMA4_IMAGE_SIZE = 768
#: LLaVA-OneVision's SigLIP tile: every square image up to 384 px gives the same 1485 image tokens.
LLAVA_ONEVISION_IMAGE_SIZE = 384

_QWEN = dict(image_placeholder="<|image_pad|>", pil_image_processor="Qwen2VLImageProcessorPil", image_expansion="grid",
             mm_token_type_ids=True, image_size=STUDY_IMAGE_SIZE, patch_grid="thw")
# Pixtral-style towers: rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END]; all three are data (D) tokens.
_MISTRAL = dict(image_placeholder="[IMG]", extra_image_tokens=("[IMG_BREAK]", "[IMG_END]"),
                pil_image_processor="PixtralImageProcessorPil", image_expansion="rows", patch_grid="rows",
                vision_inputs=("pixel_values", "image_sizes"), image_size=STUDY_IMAGE_SIZE)

#: Idefics3's tile names, <row_1_col_1> ... <row_6_col_6>.
IDEFICS3_TILES = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
#: GLM-4.1V-Thinking reasons before it answers: the prefill closes an empty thought and opens the answer.
GLM_ANSWER_PREFIX = "<think></think><answer>"

ADAPTERS: dict[str, Adapter] = {
    "qwen2_vl": Adapter("qwen2_vl", "Qwen2VLForConditionalGeneration", **_QWEN),
    "qwen2_5_vl": Adapter("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", **_QWEN),
    # Qwen3-VL: 16 px patches, 2x2 merge (252 px -> 256 px, 8x8 tokens); DeepStack adds features of three
    # vision layers after decoder layers 0-2 at the image positions.
    "qwen3_vl": Adapter("qwen3_vl", "Qwen3VLForConditionalGeneration", **_QWEN,
                        injections=("deepstack_visual_embeds", "visual_pos_masks")),
    # Qwen3.5: Qwen3-VL's vision layout (no DeepStack); three of every four decoder layers are Gated DeltaNet
    # linear attention, whose heads are the value heads at linear_attn.out_proj's input (docs/families-2026.md).
    "qwen3_5": Adapter("qwen3_5", "Qwen3_5ForConditionalGeneration", **_QWEN, layer_heads=(
        ("linear_attention", "linear_attn.out_proj", "linear_num_value_heads", "linear_value_head_dim"),)),
    # Qwen3-VL-MoE (Qwen3-VL-30B-A3B): Qwen3-VL with fused experts in its sparse layers; neurons: E x I per layer.
    "qwen3_vl_moe": Adapter("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", **_QWEN,
                            injections=("deepstack_visual_embeds", "visual_pos_masks"), experts="mlp.experts"),
    "llava": Adapter("llava", "LlavaForConditionalGeneration"),
    # LLaVA-OneVision (anyres, 384 px SigLIP tiles, 27x27 patches): any square image of side <= 384 becomes the base
    # image (729 tokens) plus one 384 px crop of 27 rows of 27 + a newline = 1485 image tokens; larger sides add crops
    # (385-768 px: 3699). Images are rendered at the tile size (no upsampling, as for Gemma-3), one fixed layout.
    "llava_onevision": Adapter("llava_onevision", "LlavaOnevisionForConditionalGeneration",
                               processor="LlavaOnevisionProcessor", patch_grid="base_rows", tiles=True,
                               vision_inputs=("pixel_values", "image_sizes", "batch_num_images"),
                               image_size=LLAVA_ONEVISION_IMAGE_SIZE),
    # InternVL3 "-hf": an image up to 633 px is one 448 px tile, 256 <IMG_CONTEXT> (pixel shuffle) inside <img>...</img>.
    "internvl": Adapter("internvl", "InternVLForConditionalGeneration", image_placeholder="<IMG_CONTEXT>",
                        extra_image_tokens=("<img>", "</img>"), processor="InternVLProcessor", image_size=448),
    # Pixtral-12B is a LLaVA checkpoint with a Pixtral vision tower.
    "pixtral": Adapter("pixtral", "LlavaForConditionalGeneration", **_MISTRAL),
    "mistral3": Adapter("mistral3", "Mistral3ForConditionalGeneration", **_MISTRAL),
    "gemma3": Adapter("gemma3", "Gemma3ForConditionalGeneration", image_placeholder="<start_of_image>",
                      image_size=GEMMA3_IMAGE_SIZE, attention="image_blocks"),
    # Gemma 4: 256 image tokens (768 px, 16 px patches pooled 3x3) between begin/end markers that are not D, image
    # tokens attending both ways where the config says so (use_bidirectional_attention="vision"); head widths per
    # layer from the per-layer config (sliding 256, full 512); per-layer embeddings of the token ids beside the
    # residual stream (`token_inputs`). In the MoE text variant the layer-level experts run beside the dense MLP:
    # one site holds the routed experts' neurons, then the dense MLP's (docs/families-2026.md).
    "gemma4": Adapter("gemma4", "Gemma4ForConditionalGeneration", image_placeholder="<|image|>",
                      processor="Gemma4Processor", image_size=GEMMA4_IMAGE_SIZE, attention="image_blocks",
                      vision_inputs=("pixel_values", "image_position_ids"), token_inputs="per_layer_inputs",
                      experts="experts"),
    # PaliGemma (2): prefix-LM attention (the whole prompt, image and question, attends both ways; the processor's
    # token_type_ids, all 0, switch it on) and no chat template: <image> x N (SigLIP patches, no merge: 1024 at
    # 448 px), <bos>, the task-prefixed prompt, "\n". Back-patching refuses it (analyses/backpatch.py).
    "paligemma": Adapter("paligemma", "PaliGemmaForConditionalGeneration", attention="prefix",
                         prompt_format="{image}<bos>answer en {text}\n", processor_adds=("<bos>", "\n")),
    # Idefics3 / SmolVLM2: the processor resizes an image to 4 tiles a side plus a global view (every square image
    # gets the same layout, other aspect ratios do not: one fixed size); tiles are named by row/column tokens and
    # their rows end in a newline, all part of D.
    "idefics3": Adapter("idefics3", "Idefics3ForConditionalGeneration", layers="model.text_model.layers",
                        extra_image_tokens=("<fake_token_around_image>", "<global-img>", *IDEFICS3_TILES),
                        image_text=("\n", "\n\n"), processor="Idefics3Processor",
                        vision_inputs=("pixel_values", "pixel_attention_mask"), image_size=384, patch_grid="frames",
                        tiles=True),
    # Aya Vision: an image up to 514 px is one 364 px tile, 13x13 <|IMG_PATCH|> after the plain-text tile name.
    "aya_vision": Adapter("aya_vision", "AyaVisionForConditionalGeneration", image_placeholder="<image>",
                          extra_image_tokens=("<|START_OF_IMG|>", "<|END_OF_IMG|>"), image_text=("TILE_GLOBAL",),
                          processor="AyaVisionProcessor", image_size=364),
    # GLM-4.1V: Qwen2-VL-style grid (14 px patches, 2x2 merge: 252 px -> 81 tokens) and 3-D rotary positions;
    # its fused gate_up_proj leaves the down_proj input as the neurons.
    "glm4v": Adapter("glm4v", "Glm4vForConditionalGeneration", image_placeholder="<|image|>",
                     extra_image_tokens=("<|begin_of_image|>", "<|end_of_image|>"), processor="Glm4vProcessor",
                     image_size=STUDY_IMAGE_SIZE, patch_grid="thw", answer_prefix=GLM_ANSWER_PREFIX),
    # GLM-4.6V: GLM-4.1V's image layout and prefill; its text model follows the config (glm4v_text: dense, the
    # -Flash checkpoint; glm4v_moe_text: the released 106B, first layer dense, then routed experts and one shared
    # expert, whose neurons follow the routed ones in one site: docs/families-2026.md).
    "glm46v": Adapter("glm46v", "Glm46VForConditionalGeneration", image_placeholder="<|image|>",
                      extra_image_tokens=("<|begin_of_image|>", "<|end_of_image|>"), processor="Glm46VProcessor",
                      image_size=STUDY_IMAGE_SIZE, patch_grid="thw", answer_prefix=GLM_ANSWER_PREFIX,
                      experts="mlp.experts"),
}


#: Config model types served by another family's row: the same module tree under another class name
#: (SmolVLM2-2.2B-Instruct is a "smolvlm": Idefics3 with a SmolLM2 decoder). They load with their own class.
ALIASES = {"smolvlm": "idefics3"}

#: Architectures the method cannot serve, and why: it needs image tokens inside the decoder's own sequence.
UNSERVABLE = {
    "mllama": "its decoder reads the image through cross-attention layers: the image has no tokens in the decoder "
              "sequence, so there is no data span D to attribute to, patch or align",
    "florence2": "it is an encoder-decoder model: the image and the question are encoded together and the answer "
                 "is decoded separately, so the prompt's D/Q/G positions are not decoder positions",
}


def family_of(config) -> str:
    """The adapter key for a transformers config; raises for unsupported architectures, saying why where known."""
    family = ALIASES.get(config.model_type, config.model_type)
    if family == "llava" and getattr(config.vision_config, "model_type", None) == "pixtral":
        family = "pixtral"
    if family in ADAPTERS:
        return family
    why = UNSERVABLE.get(family)
    if why is None and getattr(config, "is_encoder_decoder", False):
        why = "it is an encoder-decoder model, so the prompt's D/Q/G positions are not decoder positions"
    names = ", ".join(getattr(config, "architectures", None) or ["no architectures listed"])
    raise ValueError(f"{'cannot study' if why else 'unsupported architecture'} {family!r} ({names})"
                     f"{': ' + why if why else ''}. The method needs a decoder-only VLM that places image tokens in "
                     f"its text sequence; supported families: {', '.join(sorted(ADAPTERS))}")


def default_image_size(adapter: Adapter, config) -> int:
    """Side of the square images rendered for a model of this family and config (see `Adapter.image_size`)."""
    if adapter.image_size is not None:
        return adapter.image_size
    native = getattr(getattr(config, "vision_config", None), "image_size", None)
    return min(native or FALLBACK_IMAGE_SIZE, MAX_IMAGE_SIZE)


def layer_heads(adapter: Adapter, text_config) -> list[tuple[str, str]]:
    """Per decoder layer, the config fields of its head count and head width; refuses unknown layer types.

    A layer type (text config `layer_types`) is known when it is an attention type (ATTENTION_TYPES) or
    listed in `Adapter.layer_heads`; anything else would be a layer whose heads the package cannot name."""
    kinds = {kind: (heads, width) for kind, _, heads, width in adapter.layer_heads}
    types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    unknown = sorted(set(types) - set(kinds) - set(ATTENTION_TYPES))
    if unknown:
        raise ValueError(f"{adapter.family}: unknown decoder layer type(s) {', '.join(map(repr, unknown))}: the package "
                         f"knows {', '.join(sorted({*ATTENTION_TYPES, *kinds}))} for this family, so it cannot say "
                         "which module holds such a layer's heads (docs/families-2026.md)")
    return [kinds.get(kind, ("num_attention_heads", "head_dim")) for kind in types]
