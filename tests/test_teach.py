"""Teaching the toy a task: its vocabulary grows by exactly the unknown words, the folder loads as a model, and the
built-in tasks are kept (rehearsal, the vision tower frozen)."""
import pytest
import torch

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


@pytest.fixture(scope="module")
def solid_naming(tmp_path_factory):
    """The task registered once (a second registration from another file is refused)."""
    from modality_circuits.tasks import REGISTRY, load_task_file

    path = tmp_path_factory.mktemp("task") / "solid_naming.py"
    path.write_text(TASK)
    if "solid_naming" not in REGISTRY:
        load_task_file(path)
    return "solid_naming"


def test_teach_adds_the_unknown_words_and_writes_a_loadable_model(tmp_path, solid_naming):
    import modality_circuits as mc
    from modality_circuits.study.teach import teach

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


#: A small, fast setting (60 steps of 8 new prompts, 1/8 of the defaults' CPU time) in which the toy forgets the
#: built-in tasks without rehearsal: its learning rate is 2.5 times the default.
SMALL = dict(max_steps=60, batch=8, replay=16, lr=5e-4, eval_every=60, n_eval=8, n_builtin=16, n_test=8, n_pool=80,
             progress=False)


def test_teaching_keeps_the_builtin_tasks(tmp_path, solid_naming, one_thread):
    """Built-in accuracy (160 held-out prompts) after teaching: within 10 points with the built-in prompts rehearsed,
    down by more than 15 without them (the same setting otherwise); the vision tower is the toy's, bit for bit."""
    import modality_circuits as mc
    from modality_circuits.study.teach import teach

    kept = teach("solid_naming", tmp_path / "kept", **SMALL)
    forgot = teach("solid_naming", tmp_path / "forgot", **{**SMALL, "replay": 0})
    assert kept["builtin_accuracy_before"] == forgot["builtin_accuracy_before"] >= 0.9
    assert forgot["builtin_accuracy_after"] < forgot["builtin_accuracy_before"] - 0.15
    assert kept["builtin_accuracy_after"] >= kept["builtin_accuracy_before"] - 0.1
    toy, taught = (mc.load_model(m).hf_model.model.vision_tower.state_dict() for m in ("toy", str(tmp_path / "kept")))
    assert toy.keys() == taught.keys() and all(torch.equal(toy[k], taught[k]) for k in toy)
