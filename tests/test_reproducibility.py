"""Same inputs, same numbers: results that do not depend on free memory, chunking, task order or resume point."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from modality_circuits.circuits.circuit import Circuit, _top_mask
from modality_circuits.data.pairs import build_pairs
from modality_circuits.methods.attribution import attribute
from modality_circuits.study.cli import main


@pytest.fixture
def budget(llava):
    """Set the model's memory budget for one test (restored after)."""
    before = llava.memory_budget

    def set_to(value):
        llava.memory_budget = value

    yield set_to
    llava.memory_budget = before


def same(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """Bit for bit where MKL's strict reproducibility mode holds (modality_circuits/__init__.py); within 1e-6 of the
    largest value on other BLAS libraries, whose kernels may round a sum differently for another thread count."""
    if torch.backends.mkl.is_available():
        assert torch.equal(a, b), msg
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(a.abs().max()), msg=msg)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_attribution_is_the_same_bits_for_any_chunking(llava, budget, modality):
    """max_rows 1, 3, unlimited and three memory budgets: the same bits (sums and square sums), hence the same
    circuits; the mean also equals the mean of the per-pair scores taken separately."""
    pairs = build_pairs("counting", modality, llava, n=8, seed=1)
    runs = []
    for max_rows, memory in ((1, "64GB"), (3, "64GB"), (None, "64GB"), (None, 1), (None, "auto"), (None, "300KB")):
        budget(memory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reduced-chunk warning (tested below)
            runs.append(attribute(llava, pairs, steps=3, max_rows=max_rows, per_pair=True, progress=False))
    first = runs[0]
    for other in runs[1:]:
        for a, b in ((first.heads, other.heads), (first.neurons, other.neurons), *zip(first.square_sums, other.square_sums)):
            same(a, b)
    mean = first.per_pair[0].double().mean(0).float()  # independent: the per-pair values, averaged here
    torch.testing.assert_close(first.heads, mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_scores_and_ablations_are_the_same_bits_for_any_thread_count(family):
    """One and two intra-op threads: the same attribution sums and ablation LDs (without MKL's strict mode, measured
    on tiny Qwen2-VL: text neuron scores 2.3e-6 of the largest apart)."""
    from conftest import get_tiny

    from modality_circuits.methods.ablation import ablation_lds

    model, threads, runs = get_tiny(family), torch.get_num_threads(), []
    pairs = build_pairs("counting", "text", model, n=16, seed=1)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            s = attribute(model, pairs, steps=3, progress=False)
            runs.append((s.heads, s.neurons, ablation_lds(model, [Circuit.from_scores(s, fraction=0.2)], pairs)))
    finally:
        torch.set_num_threads(threads)
    for a, b, name in zip(*runs, ("heads", "neurons", "LDs")):
        same(a, b, name)


def test_chunks_are_canonical_whatever_memory_is_free(llava, budget, monkeypatch):
    """The rows of a chunk do not depend on the memory free now; a budget or max_rows below the canonical chunk gives
    smaller chunks, noted for the records and warned."""
    from modality_circuits.execution import budget as chunking

    sizes = set()
    for free in (2**30, 2**34, 2**38):
        monkeypatch.setattr(chunking, "free_bytes", lambda device, free=free: free)
        for memory in ("auto", "64GB"):
            budget(memory)
            sizes.add((chunking.rows(llava, 30), chunking.rows(llava, 30, backward=True)))
    assert sizes == {(chunking.canonical_rows(llava, 30), chunking.canonical_rows(llava, 30, backward=True))}
    chunking.REDUCED.clear()
    budget("64GB")
    with pytest.warns(UserWarning, match="set by max_rows"):
        assert chunking.rows(llava, 30, max_rows=3) == 3
    budget(1)
    with pytest.warns(UserWarning, match="set by the memory budget"):
        assert chunking.rows(llava, 30) == 1
    assert len(chunking.REDUCED) == 2


def test_top_mask_breaks_ties_by_the_lowest_index():
    """Many exact ties: the kept set is the first k of a stable sort on (-|score|, index), computed in Python."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (5000,), generator=g).float() * torch.randn(5000, generator=g).sign()
    for k in (0, 1, 700, 1500, 4999, 5000):
        expected = torch.zeros(5000, dtype=torch.bool)
        expected[sorted(range(5000), key=lambda i: (-abs(scores[i].item()), i))[:k]] = True
        assert torch.equal(_top_mask(scores.view(50, 100), k).flatten(), expected)
    # batched, rows with and without ties crossing the k-th place (the running count and its shortcut)
    rows = torch.stack([scores[:1000], torch.randn(1000, generator=g), scores[1000:2000].abs() + 0.5 * (scores[:1000] == 0)])
    for k in (0, 10, 300, 999):
        got = _top_mask(rows, k, batched=True)
        for row, mask in zip(rows, got):
            expected = torch.zeros(1000, dtype=torch.bool)
            expected[sorted(range(1000), key=lambda i: (-abs(row[i].item()), i))[:k]] = True
            assert torch.equal(mask, expected)


def test_a_checkpoint_resumes_under_any_budget(llava, budget, tmp_path, monkeypatch):
    """Interrupted after two requests under a small budget, the same call under another budget resumes (no warning,
    only the rest of the pairs computed) and gives the bits of an uninterrupted run."""
    pairs = build_pairs("counting", "text", llava, n=6, seed=3)
    budget("64GB")
    whole = attribute(llava, pairs, steps=2, progress=False)
    path, calls, real = tmp_path / "ig.safetensors", [], llava.call

    def counted(body, work, *args):
        calls.append(sum(len(ids) for _, _, ids in work))  # pairs in this request
        if len(calls) > 2 and stop:
            raise KeyboardInterrupt
        return real(body, work, *args)

    monkeypatch.setattr(llava, "call", counted)
    monkeypatch.setattr(llava, "chunks_per_request", 1)
    stop = True
    budget(1)  # one pair a chunk
    with pytest.raises(KeyboardInterrupt):
        attribute(llava, pairs, steps=2, progress=False, checkpoint=path)
    stop, done, calls[:] = False, sum(calls[:2]), []
    budget("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "belongs to another run; starting over" would fail here
        resumed = attribute(llava, pairs, steps=2, progress=False, checkpoint=path)
    assert 0 < done < len(pairs) and sum(calls) == len(pairs) - done
    assert torch.equal(resumed.heads, whole.heads) and torch.equal(resumed.neurons, whole.neurons)


def test_a_study_is_the_same_for_any_budget_and_task_order(llava, tmp_path):
    """Two runs, tasks in either order, about one attribution row at a time or canonical chunks: the same scores and
    circuits bit for bit, the same summary after the report's rounding, and the smaller chunks noted in the records."""
    from modality_circuits.execution.budget import row_bytes

    one_row = max(row_bytes(llava, build_pairs(t, m, llava, n=1, seed=0)[0].length, backward=True)
                  for t in ("counting", "sentiment") for m in ("text", "image"))
    args = ["reproduce", "--model", "tiny-llava", "--n", "8", "--resamples", "20", "--all-prompts"]
    main([*args, "--tasks", "counting", "sentiment", "--memory-budget", str(one_row + 1), "--out", str(tmp_path / "a")])
    main([*args, "--tasks", "sentiment", "counting", "--out", str(tmp_path / "b")])
    a, b = tmp_path / "a" / "tiny-llava", tmp_path / "b" / "tiny-llava"
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors") if ".cache" not in p.parts)
    assert len(files) == 8
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        assert x.keys() == y.keys(), f
        for key in x:
            same(x[key], y[key], f"{f} {key}")
    assert "chunking" in json.loads((a / "counting" / "text" / "curve.json").read_text())
    assert "chunking" not in json.loads((b / "counting" / "text" / "curve.json").read_text())

    def rounded(x):
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return round(x, 2) if isinstance(x, float) else x

    assert rounded(json.loads((a / "summary.json").read_text())) == rounded(json.loads((b / "summary.json").read_text()))
    # a later run of one task (other settings) updates only that task's records; the report keeps both tasks
    counting = (a / "counting" / "text" / "curve.json").read_bytes()
    main([*args, "--tasks", "sentiment", "--resamples", "30", "--out", str(tmp_path / "a")])
    assert (a / "counting" / "text" / "curve.json").read_bytes() == counting
    assert json.loads((a / "sentiment" / "text" / "curve.json").read_text())["settings"]["resamples"] == 30
    assert set(json.loads((a / "summary.json").read_text())) == {"counting", "sentiment"}
    assert "| counting |" in (a / "report.md").read_text() and "| sentiment |" in (a / "report.md").read_text()


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from modality_circuits.execution.store import LOCK, lock

    with lock(tmp_path):  # a live holder (this process)
        with pytest.raises(SystemExit, match=f"{tmp_path} is in use by another run \\(pid \\d+"):
            main(["reproduce", "--model", "tiny-llava", "--tasks", "counting", "--out", str(tmp_path)])
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                             "since": "earlier"}))  # a run killed with -9
    with lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
