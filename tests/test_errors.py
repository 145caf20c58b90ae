"""The bad-input catalogue (docs/reproducibility.md): every case a one-line error naming the input and the fix,
before any expensive work, or an undefined quantity reported as n/a with its reason, never as a number."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modality_circuits.data import tasks as task_defs
from modality_circuits.data.pairs import build_pairs
from modality_circuits.study.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["reproduce", "--model", "tiny-llava", "--n", "8", "--resamples", "20", "--all-prompts"]


@pytest.fixture
def task_file(tmp_path):
    """Write a task file deriving a task `name` from arithmetic with some functions replaced; unregistered after."""
    names = []

    def write(name, **replace):
        names.append(name)
        body = ", ".join(f"{k}={v}" for k, v in replace.items())
        path = tmp_path / f"{name}_{len(names)}.py"
        path.write_text("from PIL import Image\nfrom dataclasses import replace\n"
                        "from modality_circuits.tasks import REGISTRY, register\n"
                        f"register(replace(REGISTRY['arithmetic'], name={name!r}{', ' if body else ''}{body}))\n")
        return path

    yield write
    for name in names:
        task_defs.REGISTRY.pop(name, None)


def _one_line(err) -> str:
    """The CLI's message: one line, no traceback."""
    text = str(err.value)
    assert text.startswith("modality-circuits: error: ") and "\n" not in text and "Traceback" not in text
    return text


# --- the command line: one line before any work ------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--tasks", "nope"], "unknown task 'nope'; known tasks"),
    (["--image-size", "0"], "--image-size must be an integer >= 28"),
    (["--image-size", "100000"], r"--image-size 100000: rendering .* GiB, more than the memory budget .* give at most"),
    (["--tasks", "sentiment", "--data-dir", "MISSING"], "sentiment.csv"),
    (["--steps", "0"], "steps must be an integer >= 1"),
])
def test_cli_refuses_bad_settings_in_one_line_before_work(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message) as err:
        main([*TINY, *args, "--out", str(tmp_path)])
    _one_line(err)
    assert not any(p.suffix == ".json" for p in tmp_path.rglob("*"))


def test_cli_prints_one_line_and_a_traceback_only_with_debug(tmp_path):
    cmd = [sys.executable, "-m", "modality_circuits", "reproduce", "--model", "tiny-llava", "--tasks", "nope",
           "--out", str(tmp_path)]
    plain = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert plain.returncode == 1 and plain.stderr.strip().splitlines() == [
        plain.stderr.strip()] and "unknown task 'nope'" in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_read_only_record_folder_is_refused_before_work(tmp_path, monkeypatch):
    import os

    from modality_circuits.study import cli

    locked = tmp_path / "tiny-llava" / "counting"
    locked.mkdir(parents=True)
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))  # root writes anyway
    with pytest.raises(SystemExit, match=f"{locked} is not writable"):
        main([*TINY, "--tasks", "counting", "--out", str(tmp_path)])
    assert not list(tmp_path.rglob("*.json"))


def test_a_run_on_a_folder_in_use_is_refused(tmp_path):
    from modality_circuits.execution.store import lock

    with lock(tmp_path), pytest.raises(SystemExit, match="in use by another run"):
        main([*TINY, "--tasks", "counting", "--out", str(tmp_path)])


# --- task definitions: named as the task's slip, when the prompts are built ---------------------------------------
@pytest.mark.parametrize("replace, message", [
    ({"text": "lambda m, w, mod: ('1+1.', 'What is it?', '')"}, "empty answer"),
    ({"image": "lambda m, size: 'picture.png'"}, "must return a PIL image, got str"),
    ({"text": "lambda m, w, mod: ('1+1.', 'What is it?')"}, "must return three strings"),
])
def test_a_task_that_returns_the_wrong_thing_is_named(task_file, replace, message):
    task_defs.load_task_file(task_file("broken", **replace))
    with pytest.raises(ValueError, match=f"task 'broken': .*{message}"):
        task_defs.sample_pairs("broken", "image", 2)


def test_two_task_files_registering_one_name_are_refused(task_file):
    task_defs.load_task_file(task_file("twice"))
    with pytest.raises(ValueError, match="task 'twice' is registered twice, by .*twice_1.py and by .*twice_2.py"):
        task_defs.load_task_file(task_file("twice"))


def test_an_answer_set_word_that_is_no_answer_fails_before_work(task_file, tmp_path):
    task_defs.load_task_file(task_file("wordy", answers="lambda: ['ten and one', '1']"))
    with pytest.raises(SystemExit, match="task 'wordy': a word of its answers\\(\\) cannot be scored"):
        main([*TINY, "--tasks", "wordy", "--out", str(tmp_path)])
    assert not list(tmp_path.rglob("*.json"))


def test_an_edited_task_file_is_not_reused(task_file):
    from modality_circuits.study.steps import task_key

    task_defs.load_task_file(task_file("edited"))
    before = task_key("edited")
    task_defs.REGISTRY.pop("edited")
    task_defs.load_task_file(task_file("edited", image="lambda m, size: Image.new('RGB', (size, size))"))
    assert task_key("edited") != before


# --- methods and records ------------------------------------------------------------------------------------------
def test_a_circuit_of_another_model_is_refused_by_name(llava):
    from modality_circuits.circuits.circuit import Circuit
    from modality_circuits.methods.ablation import faithfulness

    pairs = build_pairs("counting", "text", llava, n=2, seed=0)
    L, H, T = llava.n_layers, llava.n_heads, pairs[0].length
    other = Circuit(torch.ones(L + 1, H, T, dtype=torch.bool), torch.ones(L + 1, llava.d_mlp, T, dtype=torch.bool),
                    pairs[0].spans, llava.name)
    with pytest.raises(ValueError, match="does not fit tiny-llava on these pairs"):
        faithfulness(llava, other, pairs)


def test_a_truncated_record_names_its_file(tmp_path):
    from modality_circuits.execution.store import read_json

    (tmp_path / "curve.json").write_text('{"fractions": [0.1, 0.2')
    with pytest.raises(ValueError, match="curve.json is not valid JSON"):
        read_json(tmp_path / "curve.json")


def test_interchange_without_random_draws_is_refused_before_work(llava, monkeypatch):
    from modality_circuits.analyses import interchange as ic
    from modality_circuits.circuits.circuit import Circuit

    pairs = build_pairs("counting", "text", llava, n=2, seed=0)
    c = Circuit.full(Circuit(torch.zeros(llava.n_layers, llava.n_heads, pairs[0].length, dtype=torch.bool),
                             torch.zeros(llava.n_layers, llava.d_mlp, pairs[0].length, dtype=torch.bool),
                             pairs[0].spans, llava.name))
    monkeypatch.setattr(ic, "ablation_lds", lambda *a, **k: pytest.fail("work before the check"))
    with pytest.raises(ValueError, match="n_random must be an integer >= 1"):
        ic.interchange(llava, c, c, pairs, "Q", n_random=0)


def test_a_server_error_after_every_retry_is_one_clear_error(llava, monkeypatch):
    import dataclasses

    from modality_circuits.execution import remote

    dry = dataclasses.replace(llava, remote="local", retries=1, retry_backoff=0)

    def fails(model):
        raise ConnectionResetError("HTTP 500 from the server")

    with pytest.raises(remote.RemoteUnavailable, match="failed 2 times .*HTTP 500.*try again later"):
        remote.call(dry, fails)


def test_an_attribution_row_larger_than_the_budget_is_refused_before_work(llava, tmp_path):
    from modality_circuits.study.steps import Study

    before = llava.memory_budget
    try:
        s = Study(llava, out=str(tmp_path), tasks=("counting",), n=4, all_prompts=True, memory_budget=1024)
        with pytest.raises(ValueError, match="one attribution row of .* tokens needs about .* GiB, more than the memory"):
            s.candidates("counting", "image")
    finally:
        llava.memory_budget = before


# --- weights: keyed on their content, refused when they would be silently wrong ----------------------------------
@pytest.fixture
def toy_copy(tmp_path):
    from modality_circuits.zoo.toy import toy_path

    folder = tmp_path / "my_toy"
    shutil.copytree(toy_path(), folder)
    return folder


def _edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_copy_of_the_toy_by_path_keeps_the_toy_wording_and_weights_key(toy_copy):
    from modality_circuits.zoo import load_model

    copy, toy = load_model(str(toy_copy)), load_model("toy")
    assert copy.wording == "toy" and copy.weights_id == toy.weights_id is not None


def test_replaced_weights_change_the_records_key(toy_copy):
    from modality_circuits.zoo import load_model

    before = load_model(str(toy_copy)).weights_id
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    _edit_weights(toy_copy, lambda t: t.__setitem__(name, t[name] * 1.001))
    assert load_model(str(toy_copy)).weights_id != before


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.__setitem__(k := "language_model.model.layers.0.mlp.down_proj.weight", t[k].to(torch.int32)),
     "down_proj.weight is stored as I32, not floating point"),
    (lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"), "lack 1 tensors .*up_proj.weight.*random"),
])
def test_weights_that_would_be_silently_wrong_are_refused(toy_copy, edit, message):
    from modality_circuits.zoo import load_model

    _edit_weights(toy_copy, edit)
    with pytest.raises(ValueError, match=message):
        load_model(str(toy_copy))


# --- undefined quantities: n/a with the reason -------------------------------------------------------------------
def test_a_task_whose_image_ignores_the_facts_reports_f_undefined(task_file, tmp_path):
    """p = p' on images: F is 0/0 at every fraction; no circuit fraction, overlap or interchange is a number."""
    path = task_file("blind", image="lambda m, size: Image.new('RGB', (size, size), 'white')")
    main([*TINY, "--task-file", str(path), "--tasks", "blind", "--out", str(tmp_path)])
    folder = tmp_path / "tiny-llava"
    curve = json.loads((folder / "blind" / "image" / "curve.json").read_text())
    assert curve["circuit_fraction"] is None and curve["undefined"].startswith("F undefined")
    assert all(v is None for v in curve["faithfulness"])
    overlap = json.loads((folder / "blind" / "overlap.json").read_text())
    assert all(overlap[s]["niou"]["value"] is None and "F undefined" in overlap[s]["niou_reason"] for s in "DQG")
    summary = json.loads((folder / "summary.json").read_text())["blind"]
    assert summary["minimal_faithful_fraction"]["image"] is None and summary["faithfulness_undefined"]["image"]
    report = (folder / "report.md").read_text()
    assert "n/a (F undefined)" in report and "| blind | undefined † | undefined † | undefined † |" in report
