"""Prompt content of the five tasks (docs/method.md section 1), independent of any model.

A prompt is a data part (words, or an image), a query and a one-word answer. Each task first
draws modality-free facts (`Prompt.meta`) and then renders them as text or as an image, so the
same seed gives the same underlying items in both modalities (aligned textual/visual prompts).
"""
from __future__ import annotations

import csv
import random
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageOps

from . import render

TASKS = ("counting", "arithmetic", "color_ordering", "factual_recall", "sentiment")
MODALITIES = ("text", "image")
# Tasks whose answers may span several tokens: the metric reads the answer's first token, which the
# generator makes differ between p and p' (arithmetic results are numbers, one token per digit).
FIRST_TOKEN_TASKS = frozenset({"arithmetic"})

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
ENTITIES = (
    ("Lionel Messi", "sport", "football"), ("Cristiano Ronaldo", "sport", "football"),
    ("Roger Federer", "sport", "tennis"), ("Serena Williams", "sport", "tennis"),
    ("Rafael Nadal", "sport", "tennis"), ("Michael Jordan", "sport", "basketball"),
    ("Kobe Bryant", "sport", "basketball"), ("Tiger Woods", "sport", "golf"),
    ("Muhammad Ali", "sport", "boxing"), ("Michael Phelps", "sport", "swimming"),
    ("Sachin Tendulkar", "sport", "cricket"), ("Babe Ruth", "sport", "baseball"),
    ("Eiffel Tower", "country", "France"), ("Taj Mahal", "country", "India"),
    ("Forbidden City", "country", "China"), ("Machu Picchu", "country", "Peru"),
    ("Sagrada Familia", "country", "Spain"), ("Mount Fuji", "country", "Japan"),
    ("Brandenburg Gate", "country", "Germany"), ("Angkor Wat", "country", "Cambodia"),
    ("Colosseum", "country", "Italy"), ("Acropolis", "country", "Greece"),
    ("Kremlin", "country", "Russia"),
    ("Jimi Hendrix", "instrument", "guitar"), ("Eric Clapton", "instrument", "guitar"),
    ("Louis Armstrong", "instrument", "trumpet"), ("Miles Davis", "instrument", "trumpet"),
    ("Charlie Parker", "instrument", "saxophone"), ("John Coltrane", "instrument", "saxophone"),
    ("Ringo Starr", "instrument", "drums"), ("Elton John", "instrument", "piano"),
    ("Frederic Chopin", "instrument", "piano"), ("Itzhak Perlman", "instrument", "violin"),
    ("Niccolo Paganini", "instrument", "violin"),
)
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


_PAIRS = {"counting": _pair_counting, "arithmetic": _pair_arithmetic,
          "color_ordering": _pair_color_ordering, "factual_recall": _pair_rows,
          "sentiment": _pair_sentiment}


def _rows(task: str, data_dir) -> list[dict]:
    """Items of the row-based tasks (built-in or from the CSV), keeping only those with a counterfactual."""
    if task not in ("factual_recall", "sentiment"):
        return []
    if data_dir is not None:
        rows = load_image_data(data_dir, task)
    elif task == "factual_recall":
        rows = [{"item": name, "question": FACT_QUERIES[cat], "answer": ans, "image": None,
                 "index": i} for i, (name, cat, ans) in enumerate(ENTITIES)]
    else:
        return []
    rows = [r for r in rows if any(o["question"] == r["question"] and o["answer"] != r["answer"]
                                   for o in rows)]
    if not rows:
        raise ValueError(f"{task}: no item has a counterfactual (same question, other answer)")
    return rows


# ---------------------------------------------------------------- rendering
def _text(task: str, m: dict) -> tuple[str, str, str]:
    """(data, query, answer) of a meta."""
    if task == "counting":
        return " ".join(m["words"]), COUNT_QUERY.format(PLURALS[m["obj"]]), str(m["count"])
    if task == "arithmetic":
        return f"{m['a']} {m['op']} {m['b']}", ARITH_QUERY, str(m["result"])
    if task == "color_ordering":
        data = " ".join(f"{c} {o}" for c, o in zip(m["colours"], m["objects"]))
        return data, COLOUR_QUERY.format(ORDINALS[m["k"]], m["side"]), m["colours"][m["index"]]
    return m["item"], m["question"], m["answer"]


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


def _image(task: str, m: dict, size: int) -> Image.Image:
    if task == "counting":
        return render.object_grid(m["words"], size)
    if task == "arithmetic":
        return render.char_grid(f"{m['a']}{m['op']}{m['b']}", size)
    if task == "color_ordering":
        return render.object_grid(m["objects"], size, m["colours"], start=COLOUR_ROW * render.GRID)
    if m["image"] is not None:
        return _load_image(m["image"], size)
    if task == "factual_recall":
        return render.icon(_entity_icon(m["index"]), size)
    _, shape, colour = EVENTS[m["event"]]
    return render.scene(m["person"], shape, colour, size)


def _prompt(task: str, modality: str, meta: dict, size: int) -> Prompt:
    data, query, answer = _text(task, meta)
    if modality == "text":
        return Prompt(task, modality, data, None, query, answer, meta)
    return Prompt(task, modality, None, _image(task, meta, size), query, answer, meta)


# ---------------------------------------------------------------- public API
def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def sample_pairs(task: str, modality: str, n: int, *, seed: int = 0, image_size: int = 64,
                 data_dir: str | Path | None = None) -> list[tuple[Prompt, Prompt]]:
    """n (prompt, counterfactual) pairs of one task and modality with different answers and the
    same query and slot structure. Deterministic given seed; the same seed gives the same items
    in both modalities. data_dir (CSV, see load_image_data) is used by factual_recall and
    sentiment only, for both modalities."""
    _check_task(task)
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    rng = random.Random(seed)
    rows = _rows(task, data_dir)
    pairs = []
    for _ in range(n):
        meta, cf = _PAIRS[task](rng, rows)
        pairs.append((_prompt(task, modality, meta, image_size),
                      _prompt(task, modality, cf, image_size)))
    return pairs


@lru_cache(maxsize=None)
def _arith_results() -> tuple[str, ...]:
    results = {_calc(a, op, b) for op in OPS for a in range(10, 100) for b in range(10, 100)
               if op == "+" or op == "*" or a >= b}
    return tuple(str(r) for r in sorted(results))


def answer_set(task: str) -> list[str]:
    """All possible answers of a task's built-in generator (arithmetic: every full result)."""
    _check_task(task)
    return {"counting": [str(c) for c in range(1, MAX_COUNT + 1)],
            "arithmetic": list(_arith_results()),
            "color_ordering": list(COLOURS),
            "factual_recall": sorted({ans for _, _, ans in ENTITIES}),
            "sentiment": list(SENTIMENTS)}[task]


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
    _check_task(task)
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
