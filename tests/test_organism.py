"""The organism's truth is exact (plain-torch exact patching) and `validate` recovers it (docs/validation.md)."""
import json
import math

import pytest
import torch
from organism_check import patched_effects, single_node_masks

from modality_circuits.data.pairs import build_pairs
from modality_circuits.methods.predict import keep_correct
from modality_circuits.zoo import planted as O

TOL = 1e-2  # float error on logit differences of 10^2 .. 10^4
CLEAR = 1.0  # a planted node's effect, on some pair, is at least this


def _covering(task, pairs, k):
    """k pairs that ask about every index and side of colour ordering twice (counting: the first k)."""
    if task != "color_ordering":
        return pairs[:k]
    chosen, seen = [], {}
    for p in pairs:
        key = (p.prompt.meta["index"], p.prompt.meta["side"])
        if seen.get(key, 0) < 2:
            seen[key] = seen.get(key, 0) + 1
            chosen.append(p)
    return chosen[:k]


def _check(model, truth, task, modality):
    pairs = keep_correct(model, build_pairs(task, modality, model, n=40, seed=7))
    pairs = _covering(task, pairs, 16)
    T = pairs[0].length
    ph, pn = truth.masks(task, modality, T)
    L = model.n_layers
    # every unit at all its non-planted positions at once, one row a unit
    rest_h = torch.zeros(L * model.n_heads + L * model.d_mlp, L, model.n_heads, T, dtype=torch.bool)
    rest_n = torch.zeros(L * model.n_heads + L * model.d_mlp, L, model.d_mlp, T, dtype=torch.bool)
    r = 0
    for layer in range(L):
        for u in range(model.n_heads):
            rest_h[r, layer, u] = ~ph[layer, u]
            r += 1
        for u in range(model.d_mlp):
            rest_n[r, layer, u] = ~pn[layer, u]
            r += 1
    nodes = [("head", *map(int, x)) for x in ph.nonzero()] + [("neuron", *map(int, x)) for x in pn.nonzero()]
    planted = torch.zeros(len(nodes))
    for p in pairs:
        rest = patched_effects(model, p, rest_h, rest_n)
        assert rest.abs().max() <= TOL, f"{task}/{modality}: a non-planted node matters ({float(rest.abs().max())})"
        planted = torch.maximum(planted, patched_effects(model, p, *single_node_masks(model, T, nodes)).abs())
    weak = [n for n, e in zip(nodes, planted) if e < CLEAR]
    assert not weak, f"{task}/{modality}: planted nodes without effect on {len(pairs)} pairs: {weak[:5]}"


@pytest.mark.parametrize("seed,control", [(1, False), (3, False), (2, True)])
def test_truth_is_exact(seed, control):
    model, truth = O.organism(seed, control=control)
    for task in O.TASKS:
        for modality in O.MODALITIES:
            _check(model, truth, task, modality)
    sizes = {(t, m): len(truth.nodes[t][m]["neurons"]) / len(truth.nodes[t][m]["heads"])
             for t in O.TASKS for m in O.MODALITIES}
    assert set(sizes.values()) == {O.NEURONS / O.HEADS}  # one fraction keeps heads and neurons alike


def test_seeds_place_units_differently():
    _, a = O.organism(0)
    _, b = O.organism(1)
    assert a.nodes["counting"]["text"] != b.nodes["counting"]["text"]


def test_bad_input_before_work(tmp_path):
    from modality_circuits.study.validate import validate

    with pytest.raises(TypeError, match="integer"):
        O.organism("3")
    with pytest.raises(TypeError, match="integer"):
        validate(1.5, out=str(tmp_path))
    with pytest.raises(ValueError, match="no task 'arithmetic'"):
        validate(0, tasks=["arithmetic"], out=str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError):
        validate(0, out=str(blocker / "sub"))
    with pytest.raises(SystemExit):
        from modality_circuits.study.cli import main

        main(["validate", "--seed", "x", "--out", str(tmp_path)])


def test_validate_small(tmp_path, capsys):
    from modality_circuits.study.cli import main

    main(["validate", "--seed", "0", "--out", str(tmp_path), "--tasks", "color_ordering", "--n", "12",
          "--resamples", "20"])
    text = (tmp_path / "recovery.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert record["seed"] == 0 and record["control"] is False
    for modality in ("text", "image"):
        r = record["tasks"]["color_ordering"][modality]
        assert r["precision"] == 1.0  # the top-ranked nodes are planted ones
        assert 0 < r["recall"] <= 1 and r["found"] <= r["planted"]
    f = record["findings"]
    assert set(f) == {"visual_larger", "overlap_D_below_G", "overlap_Q_between", "interchange_G_above_D",
                      "alignment_rises", "backpatch_gain"}
    assert all(f[k]["planted"] for k in f)
    assert f["overlap_D_below_G"]["detected"] and math.isclose(f["overlap_D_below_G"]["value"], 1.0)
    assert "precision" in capsys.readouterr().out


def test_report_section_from_committed_recovery(tmp_path):
    from pathlib import Path

    from modality_circuits.study.validate import organism_section

    assert organism_section(tmp_path) == []
    lines = organism_section(Path(__file__).resolve().parent.parent / "results" / "organism")
    assert lines[0] == "## Does the method recover planted circuits?"
    assert sum(line.startswith("| seed 0 control | ") for line in lines) == 7  # 6 circuits and the findings row
    from modality_circuits.study.validate import organism_tables

    seeds = organism_tables(Path(__file__).resolve().parent.parent / "results" / "organism-seeds")
    assert sum(line.startswith("| seed 3 (random p') | counting | ") for line in seeds) == 2  # labelled apart


def _changed_word(p):
    """The data position of the one word a minimal counting pair changes."""
    (i,) = [i for i, (a, b) in enumerate(zip(p.prompt.meta["words"], p.cf.meta["words"])) if a != b]
    return p.spans["D"][0] + i


def test_a_data_position_patched_alone_weighs_amp():
    """Patching every planted node of one data position moves the answer AMP times as far (docs/validation.md):
    colour ordering, text, the asked word: LD becomes −(2 AMP − 1) LD(p); sentiment, image, one of the three icon
    quarters the gather averages: LD(p) (1 − 2 AMP / 3); counting, both modalities, a minimal pair of counts one
    apart, the changed word (LD is linear in the count): −(2 AMP_COUNT − 1) LD(p). Exact patching by plain torch
    hooks."""
    model, truth = O.organism(0)
    # tolerance: the relays' positions carry the longer code, so their RMSNorm divides by a little more (~1 %); the
    # icon quarters' flags are fitted (1e-4), so the sentiment gather's weights are 1/3 to within a few %
    for task, modality, target, expected, tol in (
            ("color_ordering", "text", lambda p: p.spans["D"][0] + 2 * p.prompt.meta["index"], 1 - 2 * O.AMP, 0.03),
            ("sentiment", "image", lambda p: p.spans["D"][0] + 6, 1 - 2 * O.AMP / 3, 0.1),
            ("counting", "text", _changed_word, 1 - 2 * O.AMP_COUNT, 0.03),
            ("counting", "image", _changed_word, 1 - 2 * O.AMP_COUNT, 0.03)):
        pairs = keep_correct(model, build_pairs(task, modality, model, n=64, seed=3, counterfactuals="minimal"))
        if task == "counting":
            pairs = [p for p in pairs if abs(p.prompt.meta["count"] - p.cf.meta["count"]) == 1]
        pairs = pairs[:4]
        assert len(pairs) == 4
        ph, pn = truth.masks(task, modality, pairs[0].length)
        for p in pairs:
            t = target(p)
            heads, neurons = torch.zeros_like(ph), torch.zeros_like(pn)
            heads[..., t], neurons[..., t] = ph[..., t], pn[..., t]
            assert heads.any() and neurons.any()
            delta = float(patched_effects(model, p, heads[None], neurons[None])[0])
            ids = torch.tensor([p.answer_id, p.cf_answer_id])
            with torch.no_grad():
                logits = model.hf_model(**p.inputs).logits[0, -1, ids]
            base = float(logits[0] - logits[1])
            assert base > 1.0
            assert math.isclose(base + delta, expected * base, rel_tol=tol), (task, modality, base + delta, base)


@pytest.mark.parametrize("control", [False, True])
def test_query_units_partly_shared(control):
    """At "?" the planted image route has its own code gathers but the text route's relay neurons (so Q overlaps
    between D, disjoint, and G, shared); the control's routes share every Q, D and G unit."""
    _, truth = O.organism(0, control=control)

    def units(task, modality, kind, span):
        nodes = truth.nodes[task][modality]
        length = nodes["length"]
        at = {"D": lambda t: t < length - 3, "Q": lambda t: t == length - 3, "G": lambda t: t >= length - 2}[span]
        return {(layer, unit) for layer, unit, t in nodes[kind] if at(t)}

    for task in O.TASKS:
        for kind in ("heads", "neurons"):
            shared = {s: units(task, "text", kind, s) & units(task, "image", kind, s) for s in ("D", "Q", "G")}
            every = {s: units(task, "text", kind, s) | units(task, "image", kind, s) for s in ("D", "Q", "G")}
            assert shared["G"] == every["G"]
            if control:
                assert shared == every
            else:
                assert not shared["D"] and every["Q"]
                # the relays, and counting's raw count (it reads no D unit), not the gathers of the codes
                assert bool(shared["Q"]) == (kind == "neurons" or task == "counting")


def test_q_between_needs_both_differences():
    """overlap_Q_between: detected only when nIoU(Q) − nIoU(D) and nIoU(G) − nIoU(Q) both lie above zero."""
    from modality_circuits.study.validate import _both, _difference

    def span(value, low, high):
        return {"value": value, "low": low, "high": high}

    d, g = span(0.0, 0.0, 0.1), span(1.0, 0.9, 1.0)
    between = _both(_difference(span(0.5, 0.4, 0.6), d), _difference(g, span(0.5, 0.4, 0.6)))
    assert between == {"value": 0.5, "ci": [0.30000000000000004, 0.6]}  # min(0.4 − 0.1, 0.9 − 0.6), min(0.6, 0.6)
    like_g = _both(_difference(span(0.95, 0.9, 1.0), d), _difference(g, span(0.95, 0.9, 1.0)))
    assert like_g["ci"][0] < 0 < like_g["ci"][1]  # Q as shared as G: not between
