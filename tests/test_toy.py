"""The embedded toy VLM: loading through the adapter, size, and a regression guard on accuracy."""
import pytest

from modality_circuits.methods.predict import correct
from modality_circuits.tasks import TASKS, sample_pairs
from modality_circuits.zoo import toy

TEST_SEED = 31_337  # never used for training (training streams use seeds >= 1e9) nor for the report


def _weights_present() -> bool:
    try:
        toy.toy_path()
    except FileNotFoundError:
        return False
    return True


needs_weights = pytest.mark.skipif(
    not _weights_present(), reason=f"toy VLM weights absent from {toy.TOY_DIR}; run `{toy.TRAIN_COMMAND}`"
)


@pytest.fixture(scope="module")
def model():
    from modality_circuits import load_model

    return load_model("toy")


def test_toy_path_names_the_training_script_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "TOY_DIR", tmp_path / "toy_vlm")
    with pytest.raises(FileNotFoundError, match="train_toy_vlm.py"):
        toy.toy_path()


@needs_weights
def test_loads_through_the_llava_adapter(model):
    import transformers as T

    assert model.adapter.family == "llava"
    assert isinstance(model.hf_model, T.LlavaForConditionalGeneration)
    assert isinstance(model.processor, T.LlavaProcessor)
    assert isinstance(model.processor.image_processor, T.LlavaImageProcessorPil)
    assert model.image_size == toy.IMAGE_SIZE
    assert model.image_token_ids == (model.tokenizer.convert_tokens_to_ids("<image>"),)


@needs_weights
def test_model_folder_is_small():
    files = [f for f in toy.TOY_DIR.iterdir() if f.is_file()]
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024


@needs_weights
@pytest.mark.parametrize("task", TASKS)
def test_heldout_accuracy_matches_the_training_report(model, task):
    """Regression guard: accuracy on 50 fresh prompts is not far below the shipped report's (100 prompts)."""
    import json
    from pathlib import Path

    report = json.loads((Path(__file__).resolve().parents[1] / "results/toy/training/report.json").read_text())
    for modality in ("text", "image"):
        prompts = [p for p, _ in sample_pairs(task, modality, 50, seed=TEST_SEED, image_size=model.image_size)]
        measured = sum(correct(model, prompts)) / 50
        reported = report["heldout"][f"{task}/{modality}"]["acc"]
        assert measured >= reported - 0.2, f"{task}/{modality}: {measured:.2f} on 50 prompts, report says {reported:.2f}"
