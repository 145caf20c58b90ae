"""A researcher's view of a circuit: prompt tokens with image patches named, node records, summaries, short reprs."""
import dataclasses

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import get_tiny

import modality_circuits as mc
from modality_circuits.data.pairs import LayoutError, build_pairs, patch_grid

#: The tiny families' patch grids: 64 px images in 16 px patches, merged 2x2 where the family merges.
GRIDS = {"llava": (4, 4), "pixtral": (4, 4), "mistral3": (2, 2), "qwen2_vl": (2, 2), "qwen2_5_vl": (2, 2), "qwen3_vl": (2, 2),
         "gemma3": (2, 2), "paligemma": (4, 4), "llava_onevision": (4, 4), "internvl": (2, 2), "aya_vision": (2, 2),
         "glm4v": (2, 2), "idefics3": (2, 2), "qwen3_5": (2, 2), "qwen3_vl_moe": (2, 2),
         "glm46v": (2, 2), "gemma4": (8, 8)}


def test_pair_tokens_name_every_image_patch_row_major(tiny):
    pair = build_pairs("counting", "image", tiny, n=1)[0]
    rows, cols, where = pair.grid
    assert (rows, cols) == GRIDS[tiny.adapter.family]
    assert len(pair.tokens) == pair.length
    start, end = pair.spans["D"]
    assert sorted(where.values()) == [(r, c) for r in range(rows) for c in range(cols)]
    patches = [pair.tokens[p] for p in sorted(where)]
    assert patches == [f"<img r{r}c{c}>" for r in range(rows) for c in range(cols)]
    markers = [pair.tokens[p] for p in range(start, end) if p not in where]
    if tiny.adapter.patch_grid == "rows":  # rows closed by a break, the last by the end marker
        assert markers == ["<img break>"] * (rows - 1) + ["<img end>"]
        assert pair.tokens[start + cols] == "<img break>"
    elif tiny.adapter.patch_grid == "base_rows":  # the base grid first, then high-res rows each closed by a newline
        assert min(where) == start and max(where) == start + rows * cols - 1
        assert markers == [m for r in range(rows) for m in [f"<img hi r{r}c{c}>" for c in range(cols)] + ["<img break>"]]
    elif tiny.adapter.patch_grid == "frames":  # 2x2 tiles, each named and framed, then the global view
        tiles = [f"<img t{k} r{r}c{c}>" for k in range(4) for r in range(rows) for c in range(cols)]
        assert [m for m in markers if m.startswith("<img")] == tiles
        assert [m for m in markers if m.startswith("<row")] == ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>",
                                                                  "<row_2_col_2>"]
    else:  # start and end markers around the patches (tile names are start markers too)
        ends = int(pair.inputs["input_ids"][0, end - 1] != tiny.image_token_ids[0])
        assert markers == ["<img start>"] * (len(markers) - ends) + ["<img end>"] * ends
        assert max(where) == end - 1 - ends
    q0, q1 = pair.spans["Q"]
    assert " ".join(pair.tokens[q0:q1]).replace(" ", "") == pair.prompt.query.replace(" ", "")


def test_text_pair_tokens_are_the_tokenizers(llava):
    pair = build_pairs("counting", "text", llava, n=1)[0]
    assert pair.grid == (0, 0, {})
    assert pair.tokens == [llava.tokenizer.decode([i]) for i in pair.inputs["input_ids"][0].tolist()]


def test_patch_grid_from_image_grid_thw_and_refusals():
    qwen = get_tiny("qwen2_vl")
    pair = build_pairs("counting", "image", qwen, n=1)[0]
    wide = dataclasses.replace(pair, inputs={**pair.inputs, "image_grid_thw": torch.tensor([[1, 2, 8]])})
    assert patch_grid(qwen, wide)[:2] == (1, 4)  # 2x8 patches merged 2x2: one row of 4 tokens
    llava = get_tiny("llava")
    pair = build_pairs("counting", "image", llava, n=1)[0]
    ids = pair.inputs["input_ids"].clone()
    ids[0, pair.spans["D"][1] - 1] = 0  # 15 image tokens tile no square
    with pytest.raises(LayoutError, match="15 image tokens"):
        patch_grid(llava, dataclasses.replace(pair, inputs={**pair.inputs, "input_ids": ids},
                                              spans={**pair.spans, "D": (pair.spans["D"][0], pair.spans["D"][1] - 1)}))


def _small_circuit(pair):
    """One head at the first image patch, one neuron at the last position, their scores, and a distractor score."""
    T = pair.length
    heads, neurons = torch.zeros(2, 4, T, dtype=torch.bool), torch.zeros(2, 6, T, dtype=torch.bool)
    d0 = pair.spans["D"][0]
    heads[0, 1, d0 + 5] = neurons[1, 3, T - 1] = True
    scores = mc.Scores(torch.zeros(2, 4, T), torch.zeros(2, 6, T), pair.spans, "m", 1)
    scores.heads[0, 1, d0 + 5], scores.neurons[1, 3, T - 1], scores.neurons[0, 0, 0] = 0.5, -2.0, 9.0
    return mc.Circuit(heads, neurons, pair.spans, "m"), scores


def test_circuit_nodes_and_summary(llava):
    pair = build_pairs("counting", "image", llava, n=1)[0]
    circuit, scores = _small_circuit(pair)
    assert circuit.nodes() == [
        {"kind": "head", "layer": 0, "unit": 1, "position": pair.spans["D"][0] + 5, "span": "D"},
        {"kind": "neuron", "layer": 1, "unit": 3, "position": pair.length - 1, "span": "G"}]
    ranked = circuit.nodes(pair, scores)
    assert [r["score"] for r in ranked] == [-2.0, 0.5]  # by |score|, only the circuit's nodes
    assert ranked[0]["token"] == pair.tokens[-1] and ranked[0]["patch"] is None
    assert ranked[1]["token"] == "<img r1c1>" and ranked[1]["patch"] == (1, 1)  # 6th patch of a 4x4 grid
    assert circuit.summary() == {"D": {"heads": [1, 0], "neurons": [0, 0]}, "Q": {"heads": [0, 0], "neurons": [0, 0]},
                                 "G": {"heads": [0, 0], "neurons": [0, 1]}}
    circuit.heads[0, 0, 0] = True  # a node in the template before D
    assert circuit.summary()["other"] == {"heads": [1, 0], "neurons": [0, 0]}
    assert circuit.nodes(pair)[0]["span"] is None
    with pytest.raises(ValueError, match="tokens"):
        circuit.nodes(build_pairs("counting", "text", llava, n=1)[0])


def test_reprs_are_short(llava):
    pairs = build_pairs("counting", "image", llava, n=2)
    scores = mc.attribute(llava, pairs, steps=1, progress=False)
    circuit = mc.Circuit.from_scores(scores, fraction=0.1)
    curve = mc.faithfulness_curve(llava, scores, pairs, fractions=[0.1, 0.5])
    shown = {"VLM": llava, "Pair": pairs[0], "Scores": scores, "Circuit": circuit, "Curve": curve,
             "Faithfulness": mc.faithfulness(llava, circuit, pairs),
             "Interchange": mc.interchange(llava, circuit, circuit, pairs, "Q", n_random=2, resamples=10),
             "PositionEffect": mc.position_effect(llava, pairs, progress=False),
             "Alignment": mc.alignment(llava, pairs, build_pairs("counting", "text", llava, n=2), resamples=10,
                                       progress=False),
             "Backpatch": mc.backpatch(llava, build_pairs("sentiment", "image", llava, n=6), resamples=10,
                                       progress=False),
             "CrossInterchange": mc.interchange_both(llava, circuit, circuit, pairs, pairs, "G", n_random=2,
                                                     resamples=10, progress=False)}
    for name, obj in shown.items():
        text = repr(obj)
        assert text.startswith(f"{name}(") and len(text.splitlines()) <= 5 and "tensor(" not in text, text
    assert all(s in repr(llava) for s in ("tiny-llava", "llava", "2 layers", "float32", "cpu", "remote=False"))
    assert dataclasses.is_dataclass(llava) and dataclasses.is_dataclass(circuit)


def test_zero_bars_are_drawn():
    from modality_circuits.plot import _bars
    fig, ax = plt.subplots()
    _bars(ax, ["a", "b"], {"x": [{"value": 0.0, "low": 0.0, "high": 0.0}, {"value": 1.0, "low": 0.5, "high": 1.5}]},
          "", {"x": "red"})
    ticks = [c for c in ax.collections if len(c.get_segments()) == 1 and c.get_segments()[0][0][1] == 0]
    assert ticks and ticks[0].get_segments()[0][0][0] == pytest.approx(-0.32)  # a tick across the zero bar
    plt.close(fig)


def test_patch_regions_cover_the_image_once_per_view(tiny):
    """Every image-patch token sees a region of the image; the views (one grid, or tiles plus a global view, or a
    base image plus a high-res crop) each cover the whole image exactly once."""
    from modality_circuits.data.pairs import patch_regions

    pair = build_pairs("counting", "image", tiny, n=1)[0]
    regions = patch_regions(tiny, pair)
    d0, d1 = pair.spans["D"]
    n_image = int((pair.inputs["input_ids"][0, d0:d1] == tiny.image_token_ids[0]).sum())
    newlines = pair.tokens[d0:d1].count("<img break>") if tiny.adapter.patch_grid == "base_rows" else 0
    assert len(regions) == n_image - newlines and all(d0 <= p < d1 for p in regions)
    assert all(0 <= t < b <= 1 and 0 <= l < r <= 1 for t, l, b, r in regions.values())
    views = 2 if tiny.adapter.patch_grid in ("frames", "base_rows") else 1
    assert sum((b - t) * (r - l) for t, l, b, r in regions.values()) == pytest.approx(views)
    cover = torch.zeros(64, 64)
    for t, l, b, r in regions.values():
        cover[round(t * 64):round(b * 64), round(l * 64):round(r * 64)] += 1
    assert (cover == views).all()
