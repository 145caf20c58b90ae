"""Progress bars of the request loop: run here they move once per chunk, inside the one session of a request (the
grouping, and so the forwards and the numbers, are unchanged); sent away (the dry run) once per request."""
import dataclasses

import pytest
import torch
from tqdm.auto import tqdm

from modality_circuits.execution import budget, remote, requests


@pytest.fixture
def log(monkeypatch, llava, one_thread):
    """Events in order: ("forward", rows) for every full forward of the tiny LLaVA (its last decoder layer ran),
    ("tick", n) for every move of a request loop's bar, ("layer", postfix) for every postfix it shows; 8 chunks per
    request."""
    events = []

    class Bar(tqdm):
        def update(self, n=1):
            if not self.disable and n:
                events.append(("tick", n))
            return super().update(n)

        def set_postfix_str(self, s="", refresh=True):
            events.append(("layer", s))
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(requests, "tqdm", Bar)
    monkeypatch.setattr(llava, "chunks_per_request", 8)  # the default (other tests' cached model may hold another)
    hook = llava.layers(llava.hf_model)[-1].register_forward_hook(
        lambda _m, args, _o: events.append(("forward", args[0].shape[0])))
    yield events
    hook.remove()


@pytest.fixture(scope="module")
def found():
    from conftest import get_tiny

    import modality_circuits as mc

    model = get_tiny("llava")
    pairs = mc.build_pairs("counting", "image", model, n=4)
    scores = mc.attribute(model, pairs, steps=1, progress=False)
    circuits = [mc.Circuit.from_scores(scores, fraction=f) for f in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)]
    return pairs, scores, circuits


def _ticks(events):
    return [n for kind, n in events if kind == "tick"]


def _moves(events):
    """The forwards and ticks, without the layer postfixes."""
    return [e for e in events if e[0] != "layer"]


def test_ablation_bar_moves_per_chunk_of_one_request(llava, found, log):
    """8 circuits in chunks of 2 (max_rows 12 = 4 p' rows + 2 x 4 rows), all in one request: a tick of 2 circuits
    after each chunk's forward, not one tick of 8 when the request ends."""
    from modality_circuits.methods.ablation import ablation_lds

    pairs, _, circuits = found
    lds = ablation_lds(llava, circuits, pairs, max_rows=12, progress=True)
    assert _moves(log) == [("forward", 12), ("tick", 2)] * 4
    quiet = log.copy()
    log.clear()
    assert torch.equal(ablation_lds(llava, circuits, pairs, max_rows=12, progress=False), lds)  # bit for bit
    assert log == [e for e in quiet if e[0] == "forward"]  # the same forwards, no bar


def test_attribution_and_curve_bars_move_per_chunk(llava, found, log):
    import modality_circuits as mc

    pairs, scores, _ = found
    got = mc.attribute(llava, pairs, steps=2, max_rows=3, progress=True)  # 4 chunks of 1 pair (3 rows), one request
    assert _moves(log) == [("forward", 3), ("tick", 1)] * 4
    log.clear()
    want = mc.attribute(llava, pairs, steps=2, max_rows=3, progress=False)
    assert len(log) == 4 and torch.equal(got.heads, want.heads) and torch.equal(got.neurons, want.neurons)
    log.clear()
    fractions = [0.05, 0.1, 0.2, 0.3, 0.5, 0.8]  # with the full and empty circuits 8, 2 a chunk in 12 rows
    small = dataclasses.replace(llava, memory_budget=12 * budget.row_bytes(llava, pairs[0].length))
    curve = mc.faithfulness_curve(small, scores, pairs, fractions, progress=True)
    assert _moves(log) == [("forward", 12), ("tick", 2)] * 4  # the bar counts circuits (fractions), moving per chunk
    assert curve.values == mc.faithfulness_curve(small, scores, pairs, fractions, progress=False).values


def test_a_single_chunk_shows_each_layer_of_its_forward(llava, found, log):
    """The default budget holds the whole curve in one forward (one chunk): the bar's postfix moves per decoder layer
    (2 in the tiny LLaVA) before the one tick, and the numbers are those without a bar."""
    import modality_circuits as mc

    pairs, scores, _ = found
    curve = mc.faithfulness_curve(llava, scores, pairs, [0.1, 0.3], progress=True)
    assert log == [("layer", "layer 1/2"), ("forward", 4 * 5), ("layer", "layer 2/2"), ("tick", 4)]
    assert curve.values == mc.faithfulness_curve(llava, scores, pairs, [0.1, 0.3], progress=False).values


def test_dry_run_bar_moves_per_request_with_the_same_numbers(llava, found, log):
    """remote="local" ships each request by value (a plain list of chunks): the bar moves once per request."""
    from modality_circuits.methods.ablation import ablation_lds

    pairs, _, circuits = found
    dry = llava.with_remote("local")
    dry.chunks_per_request = 2
    sent = len(remote.EXCHANGES)
    lds = ablation_lds(dry, circuits, pairs, max_rows=12, progress=True)  # 4 chunks of 2 circuits, 2 requests
    assert len(remote.EXCHANGES) - sent == 2 and _ticks(log) == [4, 4]
    assert torch.equal(lds, ablation_lds(dry, circuits, pairs, max_rows=12, progress=False))
