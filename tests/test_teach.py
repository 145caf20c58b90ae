"""Teaching the toy a task: its vocabulary grows by exactly the unknown words, and the folder loads as a model."""
import pytest

TASK = '''
from modality_circuits.data import render
from modality_circuits.tasks import Task, register

SOLIDS = {"ball": "sphere", "box": "cube", "star": "pentagram"}


def pair(rng, rows):
    shape, other = rng.sample(sorted(SOLIDS), 2)
    return {"shape": shape}, {"shape": other}


register(Task(
    "solid_naming", pair,
    text=lambda m, wording, modality: (f"a {m['shape']}", "Name the solid .", SOLIDS[m["shape"]]),
    image=lambda m, size: render.object_grid([m["shape"]], size),
    answers=lambda: sorted(SOLIDS.values()),
))
'''


def test_teach_adds_the_unknown_words_and_writes_a_loadable_model(tmp_path):
    import modality_circuits as mc
    from modality_circuits.study.teach import teach
    from modality_circuits.tasks import load_task_file

    path = tmp_path / "solid_naming.py"
    path.write_text(TASK)
    load_task_file(path)
    toy = mc.load_model("toy")
    vocab = toy.tokenizer.get_vocab()
    words = ["Name", "solid", "sphere", "cube", "pentagram"]
    unknown = [w for w in words if w not in vocab]
    assert unknown, "the test task must use words the toy does not know"
    out = tmp_path / "taught"
    report = teach("solid_naming", out, minutes=0.05, n_pool=16, n_eval=4, n_test=6, eval_every=1, progress=False)
    assert sorted(report["words_added"]) == sorted(unknown)
    taught = mc.load_model(str(out))
    assert taught.wording == "toy"
    size = taught.hf_model.get_input_embeddings().weight.shape[0]
    assert size == toy.hf_model.get_input_embeddings().weight.shape[0] + len(unknown)
    ids = taught.tokenizer.convert_tokens_to_ids(unknown)
    assert sorted(ids) == list(range(size - len(unknown), size))  # appended after every old id
    assert taught.tokenizer.unk_token_id not in taught.tokenizer(" ".join(words))["input_ids"]
    pairs = mc.build_pairs("solid_naming", "image", taught, n=2)  # the answer is one known token now
    assert pairs[0].answer_id in ids
    assert set(report["test_accuracy"]) == {"text", "image"} and report["steps"] >= 1
    with pytest.raises(FileExistsError):
        teach("solid_naming", out, minutes=0.01)
