"""Pixtral-12B's real Tekken tokenizer (shipped with mistral-common) on a tiny random Pixtral.

mistral-common's own request encoding (`encode_chat_completion`) is the ground truth for the chat
format, the image tokens and the form of the answer the model would write after `[/INST]`.
Run with -s to see how many pairs each task keeps at the study's settings.
"""
import importlib.util
import re
import warnings

import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers import image as mistral_image
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

import modality_circuits as mc
from modality_circuits.data import tasks
from modality_circuits.data.pairs import answer_token, build_pairs, chat_text, check_layout, encode
from modality_circuits.model.adapters import STUDY_IMAGE_SIZE
from modality_circuits.zoo.tekken import NAME, tekken_path, tekken_pixtral

#: The study's candidates per task and modality: 3n with n = 48 (`study.steps.Study.candidates`).
STUDY_CANDIDATES = 3 * 48
#: Pairs kept (distinct prompts of one token layout) at the study's settings, seed 0, as measured: counting,
#: arithmetic and colour ordering keep all 144; factual recall and sentiment keep every distinct prompt there is
#: (34 entities; 4 persons x 12 events), factual recall's text only the 16 whose names share a token length.
KEPT = {("counting", "text"): 144, ("counting", "image"): 144, ("arithmetic", "text"): 144,
        ("arithmetic", "image"): 144, ("color_ordering", "text"): 144, ("color_ordering", "image"): 144,
        ("factual_recall", "text"): 16, ("factual_recall", "image"): 34, ("sentiment", "text"): 48,
        ("sentiment", "image"): 48}
#: Pixtral-12B at 252 x 252: 16-px patches, no merge -> 16 x 16 [IMG] + 15 [IMG_BREAK] + 1 [IMG_END].
IMAGE_TOKENS = 16 * 16 + 15 + 1


def _resize(image, size):
    """mistral-common's pixel transform without opencv (only the pixels differ; token ids and shapes do not)."""
    pixels = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)
    return mistral_image.normalize(pixels, mistral_image.DATASET_MEAN, mistral_image.DATASET_STD)


@pytest.fixture(scope="module")
def mistral():
    """mistral-common's tokenizers for the same file: test mode (prompts) and finetuning mode (prompt + reply)."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("cv2") is None:  # mistral-common resizes pixels with opencv
            mp.setattr(mistral_image, "transform_image", _resize)
        yield (MistralTokenizer.from_file(str(tekken_path()), mode=ValidationMode.test),
               MistralTokenizer.from_file(str(tekken_path()), mode=ValidationMode.finetuning))


@pytest.fixture(scope="module")
def model():
    return tekken_pixtral()


def _messages(prompt, answer=None):
    if prompt.modality == "image":
        content = [ImageChunk(image=prompt.image), TextChunk(text=prompt.query)]
    else:
        content = f"{prompt.data}\n{prompt.query}"
    return [UserMessage(content=content)] + ([AssistantMessage(content=answer)] if answer is not None else [])


def reference(tokenizer, prompt, answer=None):
    """mistral-common's encoding of the user turn (and the assistant's reply)."""
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=_messages(prompt, answer)))


def test_the_tokenizer_is_pixtral_12b_s(model, mistral):
    tekken = mistral[0].instruct_tokenizer
    tok = model.tokenizer
    assert len(tok) == tekken.tokenizer.n_words == 131072 == model.text_config.vocab_size
    ids = tekken.image_encoder.special_ids
    assert model.image_token_ids == (ids.img, ids.img_break, ids.img_end) == (10, 12, 13)
    assert tok.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]) == [10, 12, 13]
    text = 'Sequence: star fish tree.\nHow many "purple" are in the image? 147+52. Answer in a single word.'
    assert tok(text, add_special_tokens=False)["input_ids"] == tekken.tokenizer.encode(text, bos=False, eos=False)
    assert model.image_size == STUDY_IMAGE_SIZE and model.wording == "study"


@pytest.mark.parametrize("modality", tasks.MODALITIES)
def test_rendered_prompt_is_mistral_common_s_encoding(model, mistral, modality):
    """The package's chat text for an image + text (or text) user turn tokenizes to mistral-common's ids."""
    prompt = tasks.sample_pairs("counting", modality, 1, image_size=STUDY_IMAGE_SIZE, wording="study")[0][0]
    text = chat_text(model, prompt)
    assert text.startswith("<s>[INST]") and text.endswith("[/INST]")
    inputs = encode(model, [text], [prompt.image] if prompt.image is not None else None)
    ref = reference(mistral[0], prompt)
    assert inputs["input_ids"][0].tolist() == ref.tokens
    if modality == "image":
        assert prompt.image.size == (252, 252)
        assert sum(t in model.image_token_ids for t in ref.tokens) == IMAGE_TOKENS
        assert tuple(inputs["pixel_values"].shape[1:]) == ref.images[0].shape == (3, 256, 256)
        assert inputs["image_sizes"][0].tolist() == [256, 256]


@pytest.mark.parametrize("modality", tasks.MODALITIES)
@pytest.mark.parametrize("task", tasks.TASKS)
def test_five_tasks_at_the_study_s_settings(model, mistral, task, modality):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = build_pairs(task, modality, model, n=STUDY_CANDIDATES, seed=0)
    skipped = sum(int(m.group(1)) for w in caught if (m := re.search(r"skipped (\d+) candidate", str(w.message))))
    print(f"\n{task}/{modality}: keeps {len(pairs)} of {STUDY_CANDIDATES} asked ({skipped} candidates skipped), "
          f"{pairs[0].length} tokens, spans {pairs[0].spans}")
    assert len(pairs) >= KEPT[task, modality]
    check_layout(pairs)
    tok, (test, finetuning) = model.tokenizer, mistral
    for i, pair in enumerate(pairs):
        ids, cf_ids = pair.inputs["input_ids"][0], pair.cf_inputs["input_ids"][0]
        assert ids.shape == cf_ids.shape and pair.spans == pairs[0].spans
        (d0, d1), (q0, q1), (g0, g1) = (pair.spans[s] for s in "DQG")
        assert (d0, d1 <= q0 < q1 == g0, g1) == (2, True, len(ids))  # after "<s>[INST]"; G is "[/INST]"
        assert tok.convert_ids_to_tokens(ids[g0:g1].tolist()) == ["[/INST]"]
        assert tok.decode(ids[q0:q1]).strip() == pair.prompt.query
        for prompt, answer_id in ((pair.prompt, pair.answer_id), (pair.cf, pair.cf_answer_id)):
            # the answer's first token, bare after [/INST] (no leading space): a real token, a prefix of the answer
            piece = tok.decode([answer_id])
            assert piece and not piece[0].isspace() and prompt.answer.startswith(piece)
            assert answer_id not in tok.all_special_ids
        assert pair.answer_id != pair.cf_answer_id
        if modality == "image":
            d = ids[d0:d1].tolist()
            assert len(d) == IMAGE_TOKENS and d1 - d0 == IMAGE_TOKENS
            assert (d.count(10), d.count(12), d.count(13), d[-1]) == (256, 15, 1, 13)
            assert model.image_mask(ids).nonzero().flatten().tolist() == list(range(d0, d1))
            assert pair.grid[:2] == (16, 16)
        else:
            assert not model.image_mask(ids).any()
            assert tok.decode(ids[d0:d1]).strip() == pair.prompt.data
        if modality == "text" or i < 2:  # mistral-common's encoding is the ground truth (images: the first two)
            for prompt, inputs, answer_id in ((pair.prompt, pair.inputs, pair.answer_id),
                                              (pair.cf, pair.cf_inputs, pair.cf_answer_id)):
                assert inputs["input_ids"][0].tolist() == reference(test, prompt).tokens
                reply = reference(finetuning, prompt, prompt.answer).tokens
                assert reply[len(ids)] == answer_id  # the first token of the reply after [/INST]


def test_answer_form_and_split_words(model):
    """What Tekken exposed: the answer follows [/INST] without a space, and one-word answers it splits
    ("purple" -> "pur" "ple", "happy" -> "h" "appy", "12" -> "1" "2") are scored at their first token."""
    tok = model.tokenizer
    p, cf = tasks.sample_pairs("color_ordering", "text", 1, image_size=STUDY_IMAGE_SIZE, wording="study")[0]
    text = chat_text(model, p)
    first = {}
    for answer in ("4", "12", "purple", "happy", "red"):
        q = tasks.Prompt(p.task, p.modality, p.data, p.image, p.query, answer, p.meta)
        first[answer] = tok.convert_ids_to_tokens(answer_token(model, text, q))
    assert first == {"4": "4", "12": "1", "purple": "pur", "happy": "h", "red": "red"}
    several = tasks.Prompt(p.task, p.modality, p.data, p.image, p.query, "very happy", p.meta)
    with pytest.raises(ValueError, match="single-token"):
        answer_token(model, text, several)
    # every answer of a word task keeps its own first token (back-patching scores over the answer set)
    for task in ("counting", "color_ordering", "factual_recall", "sentiment"):
        answers = tasks.answer_set(task)
        ids = {answer_token(model, text, tasks.Prompt(task, "text", p.data, None, p.query, a, {})) for a in answers}
        assert len(ids) == len(answers), task


def test_load_model_by_name():
    model = mc.load_model(NAME)
    assert model.name == NAME and model.adapter.family == "pixtral" and len(model.tokenizer) == 131072
