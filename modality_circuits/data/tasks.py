"""Prompt content of the five tasks (docs/method.md section 1), independent of any model.

A prompt is a data part (words, or an image), a query and a one-word answer. Each task first
draws modality-free facts (`Prompt.meta`) and then renders them as text or as an image, so the
same seed gives the same underlying items in both modalities (aligned textual/visual prompts).
"""
from __future__ import annotations

import csv
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from . import render

#: The five built-in tasks (the study's); `REGISTRY` holds them and any the user registers.
TASKS = ("counting", "arithmetic", "color_ordering", "factual_recall", "sentiment")
MODALITIES = ("text", "image")
#: How p' is drawn: "random" (the task's own draw: for counting an independent sequence, as the study) or "minimal"
#: (where a task defines one, p' changes only what the answer needs; the others keep their own).
COUNTERFACTUALS = ("random", "minimal")

# counting
N_WORDS, MAX_COUNT = 7, 6
OBJECTS = render.OBJECTS
PLURALS = {"ball": "balls", "box": "boxes", "car": "cars", "cat": "cats", "fish": "fish",
           "house": "houses", "star": "stars", "tree": "trees"}
COUNT_QUERY = "How many {} are there?"
# arithmetic
OPS = ("+", "-", "*", "/")
ARITH_QUERY = "What is the result of the calculation?"
# colour ordering
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
ORDINALS = ("first", "second", "third", "fourth")
SIDES = ("left", "right")
COLOUR_QUERY = "What is the colour of the {} object from the {}?"
COLOUR_ROW = 1  # grid row holding the four objects
# factual recall: (name, category, answer)
FACT_QUERIES = {"sport": "What sport does this person play?",
                "country": "Which country is this landmark in?",
                "instrument": "What instrument does this person play?"}
# factual recall: question kind -> (entity, answer), in the order the pairs draw them
_ENTITIES = {
    "sport": (
        ("Lionel Messi", "football"), ("Cristiano Ronaldo", "football"), ("Roger Federer", "tennis"),
        ("Serena Williams", "tennis"), ("Rafael Nadal", "tennis"), ("Michael Jordan", "basketball"),
        ("Kobe Bryant", "basketball"), ("Tiger Woods", "golf"), ("Muhammad Ali", "boxing"),
        ("Michael Phelps", "swimming"), ("Sachin Tendulkar", "cricket"), ("Babe Ruth", "baseball"),
    ),
    "country": (
        ("Eiffel Tower", "France"), ("Taj Mahal", "India"), ("Forbidden City", "China"), ("Machu Picchu", "Peru"),
        ("Sagrada Familia", "Spain"), ("Mount Fuji", "Japan"), ("Brandenburg Gate", "Germany"),
        ("Angkor Wat", "Cambodia"), ("Colosseum", "Italy"), ("Acropolis", "Greece"), ("Kremlin", "Russia"),
    ),
    "instrument": (
        ("Jimi Hendrix", "guitar"), ("Eric Clapton", "guitar"), ("Louis Armstrong", "trumpet"),
        ("Miles Davis", "trumpet"), ("Charlie Parker", "saxophone"), ("John Coltrane", "saxophone"),
        ("Ringo Starr", "drums"), ("Elton John", "piano"), ("Frederic Chopin", "piano"),
        ("Itzhak Perlman", "violin"), ("Niccolo Paganini", "violin"),
    ),
}
ENTITIES = tuple((name, question, answer) for question, rows in _ENTITIES.items() for name, answer in rows)
ICON_COLOURS = tuple(c for c in render.RGB if c != "black")
# sentiment: event -> (sentiment, icon shape, icon colour)
SENTIMENTS = ("happy", "sad", "neutral")
SENTIMENT_QUERY = "Is this scene happy, sad or neutral?"
PERSONS = render.PERSONS
EVENTS = {
    "party": ("happy", "star", "orange"), "wedding": ("happy", "ring", "yellow"),
    "concert": ("happy", "diamond", "purple"), "festival": ("happy", "triangle", "red"),
    "funeral": ("sad", "box", "black"), "hospital": ("sad", "cross", "red"),
    "cemetery": ("sad", "cross", "gray"), "grave": ("sad", "triangle", "gray"),
    "office": ("neutral", "box", "blue"), "bank": ("neutral", "house", "green"),
    "station": ("neutral", "car", "blue"), "library": ("neutral", "box", "brown"),
}
CSV_COLUMNS = ("item", "question", "answer", "image")
#: Wordings: "study" is the study's own (instruction-tuned models need its closing instruction to answer in one
#: token; docs/method.md section 1); "toy" is the simpler wording the embedded model and the tiny test models know.
WORDINGS = ("study", "toy")


@dataclass(frozen=True)
class Prompt:
    task: str
    modality: str                  # "text" or "image"
    data: str | None               # textual data part (text modality), else None
    image: Image.Image | None      # rendered image (image modality), else None
    query: str                     # same wording in both modalities
    answer: str                    # one word; the model must produce its first token
    meta: dict                     # JSON-serialisable generator facts


# ---------------------------------------------------------------- modality-free generators
def _count_meta(rng: random.Random, obj: str, count: int) -> dict:
    others = [o for o in OBJECTS if o != obj]
    words = [obj] * count + [rng.choice(others) for _ in range(N_WORDS - count)]
    rng.shuffle(words)
    return {"obj": obj, "count": count, "words": words}


def _pair_counting(rng, rows):
    obj = rng.choice(OBJECTS)
    c, c_cf = rng.sample(range(1, MAX_COUNT + 1), 2)
    return _count_meta(rng, obj, c), _count_meta(rng, obj, c_cf)


def _minimal_counting(rng, rows):
    """p' = p with |c − c'| words changed, all the same way (matches replaced by other objects, or others by the
    queried object): every changed word moves the count toward p''s."""
    obj = rng.choice(OBJECTS)
    c, c_cf = rng.sample(range(1, MAX_COUNT + 1), 2)
    meta = _count_meta(rng, obj, c)
    words = list(meta["words"])
    changeable = [i for i, w in enumerate(words) if (w == obj) == (c_cf < c)]
    for i in rng.sample(changeable, abs(c - c_cf)):
        words[i] = rng.choice([o for o in OBJECTS if o != obj]) if c_cf < c else obj
    return meta, {"obj": obj, "count": c_cf, "words": words}


def _calc(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _arith_meta(rng: random.Random, op: str) -> dict:
    """Two-digit operands; a >= b for - and /; for / the quotient is drawn uniformly from 1-9."""
    if op == "/":
        q = rng.randint(1, 9)
        b = rng.randint(10, 99 // q)
        a = q * b + rng.randint(0, min(b - 1, 99 - q * b))
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-":
            a, b = max(a, b), min(a, b)
    result = _calc(a, op, b)
    return {"a": a, "op": op, "b": b, "result": result, "first": str(result)[0]}


def _pair_arithmetic(rng, rows):
    op = rng.choice(OPS)
    meta = _arith_meta(rng, op)
    while (cf := _arith_meta(rng, op))["first"] == meta["first"]:
        pass
    return meta, cf


def _colour_meta(rng, objects, k, side, avoid=None) -> dict:
    index = k if side == "left" else 3 - k
    while (colours := rng.sample(COLOURS, 4))[index] == avoid:
        pass
    return {"objects": objects, "colours": colours, "k": k, "side": side, "index": index}


def _pair_color_ordering(rng, rows):
    objects = rng.sample(OBJECTS, 4)
    k, side = rng.randrange(4), rng.choice(SIDES)
    meta = _colour_meta(rng, objects, k, side)
    return meta, _colour_meta(rng, objects, k, side, avoid=meta["colours"][meta["index"]])


def _pair_rows(rng, rows):
    """A row and another row with the same question and a different answer
    (preferring an item with the same number of words)."""
    row = rng.choice(rows)
    cands = [r for r in rows if r["question"] == row["question"] and r["answer"] != row["answer"]]
    same = [r for r in cands if len(r["item"].split()) == len(row["item"].split())]
    return dict(row), dict(rng.choice(same or cands))


def _scene_meta(person: str, event: str) -> dict:
    return {"person": person, "event": event, "item": f"a {person} at a {event}",
            "question": SENTIMENT_QUERY, "answer": EVENTS[event][0], "image": None}


def _pair_sentiment(rng, rows):
    if rows:
        return _pair_rows(rng, rows)
    person, event = rng.choice(PERSONS), rng.choice(sorted(EVENTS))
    other = [e for e in sorted(EVENTS) if EVENTS[e][0] != EVENTS[event][0]]
    return _scene_meta(person, event), _scene_meta(person, rng.choice(other))


def _with_counterfactual(task: str, rows: list[dict]) -> list[dict]:
    """The rows that have a counterfactual (same question, other answer)."""
    rows = [r for r in rows if any(o["question"] == r["question"] and o["answer"] != r["answer"] for o in rows)]
    if not rows:
        raise ValueError(f"{task}: no item has a counterfactual (same question, other answer)")
    return rows


def _rows_factual_recall(data_dir) -> list[dict]:
    if data_dir is not None:
        return _with_counterfactual("factual_recall", load_image_data(data_dir, "factual_recall"))
    return _with_counterfactual("factual_recall", [
        {"item": name, "question": FACT_QUERIES[cat], "answer": ans, "image": None, "index": i}
        for i, (name, cat, ans) in enumerate(ENTITIES)])


def _rows_sentiment(data_dir) -> list[dict]:
    """CSV items when given; else none (scenes are drawn by `_pair_sentiment`)."""
    return _with_counterfactual("sentiment", load_image_data(data_dir, "sentiment")) if data_dir is not None else []


# ---------------------------------------------------------------- rendering
def _text_counting(m: dict, wording: str, modality: str) -> tuple[str, str, str]:
    if wording == "toy":
        return " ".join(m["words"]), COUNT_QUERY.format(PLURALS[m["obj"]]), str(m["count"])
    where = "sequence" if modality == "text" else "image"
    return (f"Sequence: {' '.join(m['words'])}.", f'How many "{m["obj"]}" are in the {where}? Answer in a single number.',
            str(m["count"]))


def _text_arithmetic(m: dict, wording: str, modality: str) -> tuple[str, str, str]:
    if wording == "toy":
        return f"{m['a']} {m['op']} {m['b']}", ARITH_QUERY, str(m["result"])
    return (f"Question: {m['a']}{m['op']}{m['b']}.",
            "What is the result of the given arithmetic calculation? Answer in a single number.", str(m["result"]))


def _text_color_ordering(m: dict, wording: str, modality: str) -> tuple[str, str, str]:
    answer = m["colours"][m["index"]]
    if wording == "toy":
        data = " ".join(f"{c} {o}" for c, o in zip(m["colours"], m["objects"]))
        return data, COLOUR_QUERY.format(ORDINALS[m["k"]], m["side"]), answer
    c = m["colours"]
    data = (f"In a scene with four objects arranged horizontally, there is a {c[0]} object, a {c[1]} object, "
            f"a {c[2]} object and a {c[3]} object.")
    return data, f"What is the color of the {ORDINALS[m['k']]} object from the {m['side']}? Answer in a single word.", answer


def _text_row(m: dict, wording: str, modality: str) -> tuple[str, str, str]:
    """Factual recall and CSV items: the item, its question, its answer."""
    if wording == "toy":
        return m["item"], m["question"], m["answer"]
    return f"Consider {m['item']}.", m["question"], m["answer"]


def _text_sentiment(m: dict, wording: str, modality: str) -> tuple[str, str, str]:
    if wording == "toy":
        return m["item"], m["question"], m["answer"]
    return f'"""{m["item"]}"""', "Is this scene happy, sad, or neutral? Answer in a single word.", m["answer"]


def _entity_icon(index: int) -> list[tuple[int, str, str]]:
    """Deterministic 2-4 part icon of built-in entity `index`."""
    rng = random.Random(f"entity-{index}")
    cells = rng.sample(range(render.GRID ** 2), 2 + index % 3)
    return [(c, rng.choice(render.SHAPES), rng.choice(ICON_COLOURS)) for c in sorted(cells)]


def _load_image(path: str, size: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            return ImageOps.pad(img.convert("RGB"), (size, size), color=render.BACKGROUND)
    except (OSError, SyntaxError) as err:  # PIL's errors for unknown formats, truncated and broken files
        raise ValueError(f"image {path} cannot be read ({err}): replace it with a PNG or JPEG file") from None


def _image_row(m: dict, size: int) -> Image.Image:
    """A CSV item's image, else the built-in entity's icon."""
    return _load_image(m["image"], size) if m["image"] is not None else render.icon(_entity_icon(m["index"]), size)


def _image_sentiment(m: dict, size: int) -> Image.Image:
    if m["image"] is not None:
        return _load_image(m["image"], size)
    _, shape, colour = EVENTS[m["event"]]
    return render.scene(m["person"], shape, colour, size)


# ---------------------------------------------------------------- tasks as data
@dataclass(frozen=True)
class Task:
    """A task as data: everything `build_pairs`, the study, back-patching and the report need.

    pair(rng, rows) -> (meta, counterfactual meta): modality-free facts of p and p', different answers;
    text(meta, wording, modality) -> (data words, query, answer) (the visual prompt uses its query);
    image(meta, size) -> the visual data part (a PIL image of size x size);
    answers() -> every answer the task can have (back-patching scores over them);
    rows(data_dir) -> the items of a row-based task (a CSV folder, see `load_image_data`), or None;
    minimal(rng, rows) -> like `pair`, but p' changes only what the answer needs (counterfactuals="minimal"), or None;
    first_token: answers may be several words, the metric reads the first token (the generator makes it differ);
    a one-word answer a tokenizer splits (Tekken: "purple" -> "pur" "ple") is scored at its first token anyway.
    """

    name: str
    pair: Callable[[random.Random, list], tuple[dict, dict]]
    text: Callable[[dict, str, str], tuple[str, str, str]]
    image: Callable[[dict, int], Image.Image]
    answers: Callable[[], list[str]]
    rows: Callable[[str | Path | None], list[dict]] | None = None
    first_token: bool = False
    minimal: Callable[[random.Random, list], tuple[dict, dict]] | None = None

    def __repr__(self) -> str:
        return f"Task({self.name!r})"


#: Every task by name: the five built-ins, and what `register` (or `--task-file`) adds.
REGISTRY: dict[str, Task] = {}
#: The file that registered each task (a task file's path; this module for the built-ins).
ORIGINS: dict[str, str] = {}


def register(task: Task) -> Task:
    """Make `task` usable by name everywhere a built-in task is (build_pairs, the study, the CLI, the report)."""
    if not task.name.isidentifier():
        raise ValueError(f"task name {task.name!r} must be a Python identifier (letters, digits, underscores)")
    if task.name in TASKS and task.name in REGISTRY:
        raise ValueError(f"{task.name!r} is a built-in task; give yours another name")
    origin = os.path.abspath(sys._getframe(1).f_code.co_filename)  # the registering file (it may do so again)
    if task.name in REGISTRY and ORIGINS.get(task.name) != origin:
        raise ValueError(f"task {task.name!r} is registered twice, by {ORIGINS.get(task.name)} and by {origin}: "
                         "rename one")
    REGISTRY[task.name], ORIGINS[task.name] = task, origin
    return task


def get_task(task: "str | Task") -> Task:
    """The registered task of that name (or `task` itself); a clear error listing the known names."""
    if isinstance(task, Task):
        return task
    if task not in REGISTRY:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(REGISTRY)} "
                         "(register your own with modality_circuits.tasks.register or --task-file)")
    return REGISTRY[task]


def load_task_file(path: str | Path) -> list[str]:
    """Run a Python file that registers tasks (`register(Task(...))`); returns the names it added."""
    import runpy

    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise FileNotFoundError(f"task file {path} not found (a .py file that calls modality_circuits.tasks.register)")
    before = set(REGISTRY)
    runpy.run_path(str(path), run_name=f"task_file_{path.stem}")
    added = [n for n in REGISTRY if n not in before]
    if not added:
        raise ValueError(f"{path} registered no task: call modality_circuits.tasks.register(Task(...)) in it")
    return added


def _prompt(task: Task, modality: str, meta: dict, size: int, wording: str) -> Prompt:
    """One prompt; what a task's functions return is checked here, so a task file's slip is named as such."""
    parts = task.text(meta, wording, modality)
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(isinstance(x, str) for x in parts)):
        raise ValueError(f"task {task.name!r}: text(meta, wording, modality) must return three strings (data, query, "
                         f"answer), got {parts!r}")
    data, query, answer = parts
    if not answer.strip():
        raise ValueError(f"task {task.name!r}: text() gave an empty answer for {meta}: every prompt needs an answer word")
    if modality == "text":
        return Prompt(task.name, modality, data, None, query, answer, meta)
    image = task.image(meta, size)
    if not isinstance(image, Image.Image):
        raise ValueError(f"task {task.name!r}: image(meta, size) must return a PIL image, got {type(image).__name__}")
    return Prompt(task.name, modality, None, image, query, answer, meta)


def sample_pairs(task: "str | Task", modality: str, n: int, *, seed: int = 0, image_size: int = 64,
                 data_dir: str | Path | None = None, wording: str = "toy",
                 counterfactuals: str = "random") -> list[tuple[Prompt, Prompt]]:
    """n (prompt, counterfactual) pairs of one task and modality with different answers and the
    same query and slot structure. Deterministic given seed; the same seed gives the same items
    in both modalities. data_dir (CSV, see load_image_data) is read by row-based tasks (factual
    recall, sentiment), for both modalities. wording: "toy" or "study" (WORDINGS). counterfactuals
    (COUNTERFACTUALS): "random", the task's own p' (the study's); "minimal", its `minimal` one where it has one."""
    task = get_task(task)
    draw = pair_function(task, counterfactuals)
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; expected one of {WORDINGS}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    rng = random.Random(seed)
    rows = task.rows(data_dir) if task.rows is not None else []
    pairs = []
    for _ in range(n):
        meta, cf = draw(rng, rows)
        pairs.append((_prompt(task, modality, meta, image_size, wording),
                      _prompt(task, modality, cf, image_size, wording)))
    return pairs


@lru_cache(maxsize=None)
def _arith_results() -> tuple[str, ...]:
    results = {_calc(a, op, b) for op in OPS for a in range(10, 100) for b in range(10, 100)
               if op == "+" or op == "*" or a >= b}
    return tuple(str(r) for r in sorted(results))


def pair_function(task: "str | Task", counterfactuals: str = "random") -> Callable:
    """The generator of (p, p') metas the `counterfactuals` setting picks for `task`."""
    if counterfactuals not in COUNTERFACTUALS:
        raise ValueError(f"counterfactuals must be one of {', '.join(COUNTERFACTUALS)}, got {counterfactuals!r}")
    task = get_task(task)
    return task.minimal if counterfactuals == "minimal" and task.minimal is not None else task.pair


def answer_set(task: "str | Task") -> list[str]:
    """All possible answers of a task (arithmetic: every full result)."""
    return list(get_task(task).answers())


def vocabulary() -> list[str]:
    """Sorted words of every textual prompt and answer: whitespace-split words plus their
    word/punctuation pieces (so both 'there?' and 'there', '?'), digits 0-9 and operators."""
    texts = [*OBJECTS, *(COUNT_QUERY.format(p) for p in PLURALS.values()),
             *(str(x) for x in range(100)), *OPS, ARITH_QUERY, *COLOURS,
             *(COLOUR_QUERY.format(k, s) for k in ORDINALS for s in SIDES),
             *(name for name, _, _ in ENTITIES), *FACT_QUERIES.values(),
             *(_scene_meta(p, e)["item"] for p in PERSONS for e in EVENTS), SENTIMENT_QUERY,
             *(a for t in TASKS for a in answer_set(t))]
    words = set()
    for word in " ".join(texts).split():
        words.add(word)
        words.update(re.findall(r"\w+|[^\w\s]+", word))
    return sorted(words)


def load_image_data(data_dir: str | Path, task: str) -> list[dict]:
    """Rows of data_dir/<task>.csv (UTF-8, a byte-order mark allowed; columns item,question,answer,image;
    image path relative to the CSV) as dicts with the image path resolved. Repeated rows are dropped
    with a warning; an empty file or cell is an error."""
    path = Path(data_dir) / f"{task}.csv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ValueError(f"{path} is empty; expected a header {','.join(CSV_COLUMNS)} and one row per item")
            missing = [c for c in CSV_COLUMNS if c not in reader.fieldnames]
            if missing:
                raise ValueError(f"{path}: missing columns {missing}; expected {list(CSV_COLUMNS)}")
            read = []
            for r in reader:
                row = tuple((r[c] or "").strip() for c in CSV_COLUMNS)
                if empty := [c for c, v in zip(CSV_COLUMNS, row) if not v]:
                    raise ValueError(f"{path}, line {reader.line_num}: empty {', '.join(empty)}")
                read.append(row)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 ({err.reason} at byte {err.start}); save it with UTF-8 encoding") \
            from None
    if not read:
        raise ValueError(f"{path} has a header but no rows")
    unique = list(dict.fromkeys(read))
    if len(unique) < len(read):
        warnings.warn(f"{path}: dropped {len(read) - len(unique)} repeated rows", stacklevel=2)
    rows = [dict(zip(CSV_COLUMNS, row)) for row in unique]
    for r in rows:
        image = path.parent / r["image"]
        if not image.is_file():
            raise FileNotFoundError(f"image {image} listed in {path} not found")
        r["image"] = str(image)
    return rows


for _task in (
    Task("counting", _pair_counting, _text_counting, lambda m, size: render.object_grid(m["words"], size),
         lambda: [str(c) for c in range(1, MAX_COUNT + 1)], minimal=_minimal_counting),
    Task("arithmetic", _pair_arithmetic, _text_arithmetic,
         lambda m, size: render.char_grid(f"{m['a']}{m['op']}{m['b']}", size), _arith_results, first_token=True),
    Task("color_ordering", _pair_color_ordering, _text_color_ordering,
         lambda m, size: render.object_grid(m["objects"], size, m["colours"], start=COLOUR_ROW * render.GRID),
         lambda: list(COLOURS)),
    Task("factual_recall", _pair_rows, _text_row, _image_row, lambda: sorted({ans for _, _, ans in ENTITIES}),
         rows=_rows_factual_recall),
    Task("sentiment", _pair_sentiment, _text_sentiment, _image_sentiment, lambda: list(SENTIMENTS),
         rows=_rows_sentiment),
):
    REGISTRY[_task.name] = _task
