"""The researcher's tools: a light import, plots from objects, metadata that refuses mix-ups, readable CLI output."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "nnsight", "matplotlib")


@pytest.mark.parametrize("code", ["import modality_circuits",
                                  "from modality_circuits.study.cli import build_parser; build_parser()"])
def test_import_and_parser_load_no_heavy_library(code):
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_are_the_modules_own():
    import importlib

    import modality_circuits as mc

    for name, module in mc._LAZY.items():
        assert getattr(mc, name) is getattr(importlib.import_module(module, "modality_circuits"), name)
    assert mc.tasks.load_task_file is importlib.import_module("modality_circuits.tasks").load_task_file
    name = "nope"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        getattr(mc, name)


@pytest.fixture(scope="module")
def found():
    """Scores and a circuit of the tiny LLaVA on 4 visual counting pairs, and a textual pair of the same length."""
    from conftest import get_tiny

    import modality_circuits as mc

    model = get_tiny("llava")
    pairs = mc.build_pairs("counting", "image", model, n=4)
    scores = mc.attribute(model, pairs, steps=1, progress=False)
    return model, pairs, scores, mc.Circuit.from_scores(scores, fraction=0.05)


def test_circuit_and_scores_carry_their_origin_through_the_file(found, tmp_path):
    import modality_circuits as mc

    _, _, scores, circuit = found
    assert (scores.task, scores.modality, circuit.task, circuit.modality) == ("counting", "image") * 2
    assert circuit.meta["scores"]["steps"] == 1 and "counting/image" in repr(circuit)
    circuit.save(tmp_path / "c.safetensors")
    scores.save(tmp_path / "s.safetensors")
    back, s = mc.Circuit.load(tmp_path / "c.safetensors"), mc.Scores.load(tmp_path / "s.safetensors")
    assert (back.task, back.modality, s.task, s.modality) == ("counting", "image") * 2 and back == circuit


def test_mismatched_task_model_or_pair_is_refused(found):
    import dataclasses

    import modality_circuits as mc

    model, pairs, scores, circuit = found
    other_task = dataclasses.replace(circuit, task="sentiment")
    with pytest.raises(ValueError, match="task 'sentiment'"):
        circuit | other_task
    with pytest.raises(ValueError, match="model 'other'"):
        circuit & dataclasses.replace(circuit, model="other")
    # another task's pair of the very same token layout: labelled silently before, refused now
    foreign = dataclasses.replace(pairs[0], prompt=dataclasses.replace(pairs[0].prompt, task="arithmetic"))
    with pytest.raises(ValueError, match="task 'arithmetic'"):
        circuit.nodes(foreign)
    with pytest.raises(ValueError, match="modality 'text'"):
        circuit.nodes(pairs[0], dataclasses.replace(scores, modality="text"))
    with pytest.raises(ValueError, match="task 'arithmetic'"):
        mc.faithfulness(model, circuit, [foreign])
    assert len(circuit.nodes(pairs[0], scores)) == circuit.n_heads + circuit.n_neurons


def test_circuit_map_separate_scales_untinted_image(found):
    import numpy as np

    from modality_circuits import plot

    model, pairs, scores, circuit = found
    fig = plot.circuit_map(circuit, pairs[0], scores, model=model)
    heads_ax, neurons_ax, image_ax = fig.axes[:3]
    want_heads = (scores.heads.abs() * circuit.heads).sum(1).numpy()  # (L, T): Σ |score| over the circuit's heads
    want_neurons = (scores.neurons.abs() * circuit.neurons).sum(1).numpy()
    np.testing.assert_allclose(heads_ax.images[0].get_array(), want_heads, rtol=1e-6)
    np.testing.assert_allclose(neurons_ax.images[0].get_array(), want_neurons, rtol=1e-6)
    assert heads_ax.images[0].get_clim()[1] == pytest.approx(want_heads.max(), rel=1e-6)  # its own scale
    assert neurons_ax.images[0].get_clim()[1] == pytest.approx(want_neurons.max(), rel=1e-6)
    assert len(image_ax.images) == 1 and image_ax.images[0].get_alpha() is None  # no shading layer over it
    np.testing.assert_array_equal(np.asarray(image_ax.images[0].get_array()), np.asarray(pairs[0].prompt.image))


def test_plots_from_objects(found):
    import matplotlib.figure
    import numpy as np

    import modality_circuits as mc
    from modality_circuits import plot

    model, pairs, scores, circuit = found
    text = mc.build_pairs("counting", "text", model, n=4)
    curve = mc.faithfulness_curve(model, scores, pairs, fractions=[0.01, 0.1, 1.0], progress=False)
    bp = {m: mc.backpatch(model, mc.build_pairs("sentiment", m, model, n=6), resamples=10, progress=False)
          for m in ("image", "text")}
    al = mc.alignment(model, pairs, text, resamples=10, progress=False)
    figs = {"faithfulness": plot.faithfulness({"image": curve}), "overlap": plot.overlap(mc.overlap(circuit, circuit)),
            "interchange": plot.interchange({s: mc.interchange_both(model, circuit, circuit, pairs, pairs, s, n_random=2,
                                                                    resamples=10, progress=False) for s in "DQG"}),
            "alignment": plot.alignment(al), "backpatch": plot.backpatch(bp),
            "position_effect": plot.position_effect({"image": mc.position_effect(model, pairs, progress=False)})}
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figs.values())
    bars = figs["backpatch"].axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx([bp["image"].gain.value, bp["text"].gain.value])  # points
    x, _ = figs["alignment"].axes[0].lines[0].get_data()
    assert list(x) == list(range(model.n_layers))  # layers 0-based
    np.testing.assert_allclose(figs["faithfulness"].axes[0].lines[0].get_ydata(), curve.values)


def test_tables_show_gains_in_points_and_layers_from_zero():
    from modality_circuits.study import tables

    ci = {"value": 0.5, "low": 0.25, "high": 0.75}
    row = {"config": {"src": 3, "dst": 1, "window": 2}, "base": ci, "patched": ci, "n_test": 8,
           "gain_points": {"value": 12.5, "low": 2.5, "high": 25.0}}
    text = tables.backpatch({"image": row, "text": row})
    assert "+12.5 [+2.5, +25.0]" in text and "(3, 1, 2)" in text and "0.500 [0.250, 0.750]" in text
    lines = tables.alignment({"n_prompts": 4, "ci": [ci, {"value": None, "low": None, "high": None}]}).splitlines()
    assert lines[3].split()[0] == "0" and lines[4].split() == ["1", "-"]  # 0-based layers; undefined as "-"
