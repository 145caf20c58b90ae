"""Prompt generation of the five tasks (modality_circuits.tasks / render)."""
import json
import re

import pytest
from PIL import Image

from modality_circuits.data import render
from modality_circuits.data.tasks import (
    ENTITIES,
    MODALITIES,
    ORDINALS,
    TASKS,
    _entity_icon,
    answer_set,
    load_image_data,
    sample_pairs,
    vocabulary,
)

N = 40


@pytest.fixture(scope="module")
def text_pairs():
    return {t: sample_pairs(t, "text", N, seed=7) for t in TASKS}


@pytest.fixture(scope="module")
def image_pairs():
    return {t: sample_pairs(t, "image", 8, seed=7) for t in TASKS}


@pytest.mark.parametrize("task", TASKS)
def test_pairs_differ_in_answer_and_share_structure(task, text_pairs):
    answers = set(answer_set(task))
    for p, cf in text_pairs[task]:
        assert p.task == cf.task == task and p.modality == cf.modality == "text"
        assert p.answer != cf.answer
        assert {p.answer, cf.answer} <= answers
        assert p.query == cf.query
        assert len(p.data.split()) == len(cf.data.split())
        assert p.image is None and cf.image is None
        json.dumps(p.meta), json.dumps(cf.meta)


def test_counting_answer_is_the_count(text_pairs):
    for p, cf in text_pairs["counting"]:
        assert p.meta["obj"] == cf.meta["obj"]
        for q in (p, cf):
            words = q.data.split()
            assert len(words) == 7
            assert q.answer == str(words.count(q.meta["obj"]))


def test_arithmetic_result_and_first_digit(text_pairs):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
           "*": lambda a, b: a * b, "/": lambda a, b: a // b}
    for p, cf in text_pairs["arithmetic"]:
        assert p.meta["op"] == cf.meta["op"]
        assert (p.meta["a"], p.meta["b"]) != (cf.meta["a"], cf.meta["b"])
        for q in (p, cf):
            a, op, b = q.data.split()
            assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
            if op in "-/":
                assert int(a) >= int(b)
            assert q.answer == str(ops[op](int(a), int(b))) == str(q.meta["result"])
            assert q.meta["first"] == q.answer[0]
        assert p.answer[0] != cf.answer[0]


def test_color_ordering_answer_is_colour_at_index(text_pairs):
    for p, cf in text_pairs["color_ordering"]:
        for q in (p, cf):
            words = q.data.split()
            colours, objects = words[0::2], words[1::2]
            assert len(colours) == 4 and len(set(colours)) == 4 and objects == q.meta["objects"]
            k, side = re.fullmatch(r"What is the colour of the (\w+) object from the (\w+)\?",
                                   q.query).groups()
            i = ORDINALS.index(k)
            assert q.answer == (colours[i] if side == "left" else colours[3 - i])


def test_factual_and_sentiment_counterfactuals(text_pairs):
    table = {name: ans for name, _, ans in ENTITIES}
    for p, cf in text_pairs["factual_recall"]:
        assert table[p.data] == p.answer and table[cf.data] == cf.answer
    for p, cf in text_pairs["sentiment"]:
        assert p.meta["person"] == cf.meta["person"]
        assert p.data.split()[:3] == cf.data.split()[:3]


@pytest.mark.parametrize("task", TASKS)
def test_images(task, image_pairs):
    for p, cf in image_pairs[task]:
        for q in (p, cf):
            assert q.data is None and q.modality == "image"
            assert q.image.mode == "RGB" and q.image.size == (64, 64)
            assert q.answer in answer_set(task)
        assert p.image.tobytes() != cf.image.tobytes()
    big = sample_pairs(task, "image", 1, seed=7, image_size=112)[0][0]
    assert big.image.size == (112, 112)


@pytest.mark.parametrize("task", TASKS)
def test_determinism_and_modality_alignment(task):
    a = sample_pairs(task, "image", 5, seed=3)
    b = sample_pairs(task, "image", 5, seed=3)
    c = sample_pairs(task, "image", 5, seed=4)
    t = sample_pairs(task, "text", 5, seed=3)
    assert [p.image.tobytes() for pair in a for p in pair] == \
           [p.image.tobytes() for pair in b for p in pair]
    assert [p.image.tobytes() for pair in a for p in pair] != \
           [p.image.tobytes() for pair in c for p in pair]
    assert [(p.meta, p.query, p.answer) for pair in a for p in pair] == \
           [(p.meta, p.query, p.answer) for pair in t for p in pair]
    assert sample_pairs(task, "text", 5, seed=3) == t
    assert [p.data for pair in sample_pairs(task, "text", 5, seed=4) for p in pair] != \
           [p.data for pair in t for p in pair]


def test_vocabulary_covers_all_words(text_pairs):
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab)
    assert {str(d) for d in range(10)} | {"+", "-", "*", "/"} <= vocab
    for task in TASKS:
        assert set(answer_set(task)) <= vocab
        for pair in text_pairs[task]:
            for p in pair:
                for w in f"{p.data} {p.query} {p.answer}".split():
                    assert w in vocab, w
                    assert set(re.findall(r"\w+|[^\w\s]+", w)) <= vocab, w


def test_entity_icons_are_distinct():
    icons = [tuple(_entity_icon(i)) for i in range(len(ENTITIES))]
    assert len(set(icons)) == len(icons)
    assert all(2 <= len(ic) <= 4 for ic in icons)


def test_unknown_task_or_modality():
    with pytest.raises(ValueError, match="unknown task"):
        sample_pairs("juggling", "text", 1)
    with pytest.raises(ValueError, match="unknown modality"):
        sample_pairs("counting", "audio", 1)
    with pytest.raises(ValueError, match="unknown task"):
        answer_set("juggling")
    with pytest.raises(ValueError):
        render.char_grid("x" * 17, 64)


def _write_csv(tmp_path, rows, header="item,question,answer,image"):
    (tmp_path / "factual_recall.csv").write_text(
        "\n".join([header] + [",".join(r) for r in rows]) + "\n")


def test_load_image_data_and_csv_pairs(tmp_path):
    (tmp_path / "img").mkdir()
    q = "What sport does this person play?"
    rows = [("Lionel Messi", q, "football", "img/a.png"), ("Roger Federer", q, "tennis", "img/b.png"),
            ("Tiger Woods", q, "golf", "img/c.png")]
    for (_, _, _, path), colour in zip(rows, ("red", "blue", "green")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / path)
    _write_csv(tmp_path, rows)
    data = load_image_data(tmp_path, "factual_recall")
    assert [d["item"] for d in data] == [r[0] for r in rows]
    assert data[0]["image"] == str(tmp_path / "img/a.png")
    for modality in MODALITIES:
        for p, cf in sample_pairs("factual_recall", modality, 6, seed=1, data_dir=tmp_path):
            assert p.answer != cf.answer and p.query == cf.query == q
            if modality == "image":
                assert p.image.size == (64, 64)
                assert p.image.getpixel((32, 32)) != cf.image.getpixel((32, 32))
            else:
                assert p.data in {r[0] for r in rows}


def test_load_image_data_errors(tmp_path):
    _write_csv(tmp_path, [("Lionel Messi", "q", "football", "missing.png")])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image_data(tmp_path, "factual_recall")
    _write_csv(tmp_path, [("Lionel Messi", "q", "football")], header="item,question,answer")
    with pytest.raises(ValueError, match="image"):
        load_image_data(tmp_path, "factual_recall")
    with pytest.raises(FileNotFoundError, match="sentiment.csv"):
        load_image_data(tmp_path, "sentiment")


def test_study_wording_is_the_studys_own():
    """Real models get the study's wording (docs/method.md section 1); the toy keeps the one it was trained on."""
    from modality_circuits.data.tasks import sample_pairs as sample

    (p, _), = sample("counting", "text", 1, seed=0, wording="study")
    assert p.data == f"Sequence: {' '.join(p.meta['words'])}."
    assert p.query == f'How many "{p.meta["obj"]}" are in the sequence? Answer in a single number.'
    (v, _), = sample("counting", "image", 1, seed=0, wording="study")
    assert v.query.endswith('are in the image? Answer in a single number.') and v.data is None
    (a, _), = sample("arithmetic", "text", 1, seed=0, wording="study")
    assert a.data == f"Question: {a.meta['a']}{a.meta['op']}{a.meta['b']}."
    (c, _), = sample("color_ordering", "text", 1, seed=0, wording="study")
    assert c.data.startswith("In a scene with four objects arranged horizontally, there is a ")
    assert c.query.endswith("Answer in a single word.")
    (f, _), = sample("factual_recall", "text", 1, seed=0, wording="study")
    assert f.data == f"Consider {f.meta['item']}."
    (s, _), = sample("sentiment", "text", 1, seed=0, wording="study")
    assert s.data.startswith('"""') and s.query == "Is this scene happy, sad, or neutral? Answer in a single word."
    from modality_circuits.data.tasks import PLURALS

    (t, _), = sample("counting", "text", 1, seed=0)  # the default: the toy's
    assert t.query == f"How many {PLURALS[t.meta['obj']]} are there?"
    with pytest.raises(ValueError, match="wording"):
        sample("counting", "text", 1, wording="poetic")


def test_a_registered_task_goes_everywhere_a_builtin_does(tmp_path):
    """The README's shape-naming example runs through `reproduce --task-file` on the toy, end to end."""
    import json
    from pathlib import Path

    from modality_circuits.study.cli import main
    from modality_circuits.tasks import REGISTRY, Task, get_task, register

    root = Path(__file__).resolve().parents[1]
    main(["reproduce", "--model", "toy", "--task-file", str(root / "examples" / "shape_naming.py"), "--tasks",
          "shape_naming", "--n", "8", "--resamples", "20", "--all-prompts", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert set(summary) == {"shape_naming"} and "shape naming" in (tmp_path / "toy" / "report.md").read_text()
    assert get_task("shape_naming").answers() == ["ball", "box", "car", "star", "tree"]
    with pytest.raises(ValueError, match="built-in"):
        register(Task("counting", *[None] * 4))
    with pytest.raises(ValueError, match="known tasks: counting"):
        get_task("shapes")
    REGISTRY.pop("shape_naming")


def test_minimal_counting_counterfactuals():
    """counterfactuals="minimal": p' is p with |c − c'| words changed, all toward p''s count; "random" is the default
    (the study's independent sequence); other tasks keep their own draw; an unknown setting is refused."""
    from modality_circuits.data.tasks import sample_pairs
    from modality_circuits.study.steps import check_settings

    for p, cf in sample_pairs("counting", "text", 200, seed=1, counterfactuals="minimal"):
        obj, c, c_cf = p.meta["obj"], p.meta["count"], cf.meta["count"]
        changed = [i for i, (a, b) in enumerate(zip(p.meta["words"], cf.meta["words"])) if a != b]
        assert c != c_cf and len(changed) == abs(c - c_cf) and cf.meta["words"].count(obj) == c_cf
        assert all((p.meta["words"][i] == obj) == (c_cf < c) for i in changed)
    random = sample_pairs("counting", "text", 50, seed=1)
    assert [(p.data, cf.data) for p, cf in random] == [(p.data, cf.data) for p, cf in
                                                        sample_pairs("counting", "text", 50, seed=1,
                                                                     counterfactuals="random")]
    assert sum(sum(a != b for a, b in zip(p.meta["words"], cf.meta["words"])) > abs(p.meta["count"] - cf.meta["count"])
               for p, cf in random) > 25  # independent sequences change more words than the count needs
    colour = sample_pairs("color_ordering", "text", 5, seed=2)
    assert [(p.data, cf.data) for p, cf in colour] == [(p.data, cf.data) for p, cf in
                                                        sample_pairs("color_ordering", "text", 5, seed=2,
                                                                     counterfactuals="minimal")]
    with pytest.raises(ValueError, match="counterfactuals must be one of random, minimal"):
        sample_pairs("counting", "text", 2, counterfactuals="nearest")
    with pytest.raises(ValueError, match="counterfactuals must be one of"):
        check_settings(("counting",), n=8, steps=1, resamples=10, counterfactuals="nearest")
