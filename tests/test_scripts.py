"""Every script under experiments/ and examples/ is compiled, and each that has a quick or dry mode runs in it.

HOW says, for every script, which test runs it (or why none does): a new script fails
test_every_script_says_how_it_is_tested until it is added there.
"""
import json
import os
import py_compile
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("experiments", "examples")
STUDY_SCRIPT = "tests/test_study.py::test_experiment_script_writes_its_figure"


def _scripts(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for folder in FOLDERS for p in (ROOT / folder).rglob(pattern))


#: How the tests run each script beyond compiling it.
HOW = {
    "examples/shape_naming.py": "tests/test_tasks_data.py::test_a_registered_task_goes_everywhere_a_builtin_does",
    "experiments/ndif_local_server.py": "test_ndif_local_server_dry_run (--host local)",
    "experiments/ndif/ndif_cpu_patch.py": "test_cpu_patch_loads_only_with_nnsight_model_loading",
    "experiments/ndif/serve.sh": "compiled only: its e2e is .ci/run's remote-server step (docs/remote-server.md)",
    "experiments/gpu_check.sh": "compiled only: it needs an NVIDIA GPU",
    "experiments/bench_scale.py": "test_bench_scale_quick (--quick)",
    "experiments/bench_attribution.py": "compiled only: no quick mode (a timed benchmark: 6 subprocesses, ~20 s CPU)",
    "experiments/bench_import.py": "test_bench_import_once (--repeats 1)",
    "experiments/bench_study.py": "compiled only: a timed benchmark of one whole task (minutes of CPU per repeat)",
    "experiments/bench_reproducibility.py": "compiled only: 14 fresh processes (minutes); what it measures is tested "
                                            "in tests/test_reproducibility.py",
    "experiments/budget_linear.py": "compiled only: 12 subprocesses at Qwen3.5-27B width (about 2 minutes, 1 GB)",
    "experiments/counting_errors.py": "test_small_runs",
    "experiments/method_ablation.py": "test_small_runs",
    "experiments/train_toy_vlm.py": "test_small_runs",
    **{s: STUDY_SCRIPT for s in _scripts("[ft][ia][gb]_*.py") if s.startswith("experiments/")},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (conftest.one_thread) for every test of this module."""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _main(script: str):
    """The `main` of a script, loaded without running it."""
    return runpy.run_path(str(ROOT / script), run_name="script_under_test")["main"]


def test_every_script_says_how_it_is_tested():
    assert set(_scripts("*.py")) | set(_scripts("*.sh")) == set(HOW)


@pytest.mark.parametrize("script", _scripts("*.py"))
def test_python_script_compiles(script, tmp_path):
    py_compile.compile(str(ROOT / script), cfile=str(tmp_path / "script.pyc"), doraise=True)


@pytest.mark.parametrize("script", _scripts("*.sh") + ["scripts/setup.sh", "scripts/test.sh", "scripts/main.sh", ".ci/run",
                                              ".ci/remote-server"])
def test_shell_script_parses(script):
    run = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_ci_remote_step_says_skip_and_why_unless_enabled():
    run = subprocess.run(["bash", str(ROOT / ".ci" / "remote-server")], capture_output=True, text=True,
                         env={**_env(), "MC_CI_REMOTE": "0"})
    assert run.returncode == 0 and run.stdout.startswith("SKIP remote-server e2e: not enabled (")


def test_ndif_local_server_dry_run(tmp_path, monkeypatch, capsys):
    """The script's own check (--host local): a tiny model by name and a folder it saved, every algorithm equal."""
    import nnsight

    from modality_circuits.data.pairs import build_pairs
    from modality_circuits.methods.predict import predictions
    from modality_circuits.zoo import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", nnsight.CONFIG.APP.REMOTE_LOGGING)
    main = _main("experiments/ndif_local_server.py")
    folder, record = tmp_path / "tiny-gemma3", tmp_path / "e2e.json"
    assert main(["--save-tiny", "gemma3", str(folder)]) == 0
    assert main(["--model", "tiny-llava", str(folder), "--wording", "toy", "--host", "local", "--n", "2",
                 "--steps", "1", "--json", str(record)]) == 0
    out = json.loads(record.read_text())
    assert [m["family"] for m in out["models"]] == ["llava", "gemma3"] and out["failed"] == 0
    for m in out["models"]:
        assert len(m["rows"]) == 9 and all(r["max_abs_diff"] == 0 and "error" not in r for r in m["rows"])
    assert "REMOTE FAILED" not in capsys.readouterr().out

    # the saved folder holds the tiny model itself: same predictions as the one built in memory
    built, saved = load_model("tiny-gemma3"), load_model(str(folder), wording="toy")
    pairs = build_pairs("counting", "image", built, n=2, seed=0)
    torch.testing.assert_close(predictions(saved, pairs), predictions(built, pairs), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not know"):  # the study's wording has words it lacks
        build_pairs("counting", "image", load_model(str(folder)), n=2, seed=0)
    with pytest.raises(ValueError, match="unknown wording"):
        load_model(str(folder), wording="poetic")


def test_cpu_patch_loads_only_with_nnsight_model_loading(tmp_path):
    """The server venv's .pth line costs an interpreter nothing; a process that loads nnsight models gets the patch."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "ndif_cpu_patch.pth").write_text(f"{ROOT / 'experiments' / 'ndif'}\nimport ndif_cpu_patch\n")  # as serve.sh
    code = f"""
import site, sys
site.addsitedir({str(site)!r})
assert "ndif_cpu_patch" in sys.modules
heavy = sorted({{"torch", "transformers", "nnsight", "ray", "numpy"}} & set(sys.modules))
assert not heavy, heavy
import huggingface_hub
asked = []
huggingface_hub.HfApi.model_info = lambda self, repo, **kw: asked.append(repo) or None
from nnsight.modeling.huggingface import HuggingFaceModel
assert HuggingFaceModel._hub_parameter_count({str(tmp_path)!r}, None) is None
assert asked == [], asked  # a local folder: no Hub call
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr[-2000:]


def test_bench_import_once():
    """The import benchmark, one repeat: it prints both timings and finds no heavy module imported."""
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_import.py"), "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "import modality_circuits" in run.stdout and "--help" in run.stdout, run.stdout


def test_bench_scale_quick(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_scale.py"), "--quick", "--models", "qwen2_vl",
                          "--pairs", "1", "--steps", "1", "--repeats", "1", "--jobs", "1", "--json", str(out), "--skip",
                          "ablation", "ablation_floor", "logits_full", "logits_keep1", "logits_last"],
                         capture_output=True, text=True, cwd=ROOT, env=_env())
    assert run.returncode == 0, run.stderr[-2000:]
    steps = json.loads(out.read_text())["models"]["qwen2_vl"]["steps"]
    assert {"attribute", "attribute_floor"} <= set(steps)


def test_small_runs(tmp_path, capsys):
    """Scripts without a quick mode, at the smallest sizes their options allow."""
    _main("experiments/counting_errors.py")(["--model", "tiny-llava", "--n", "4"])
    assert "accuracy" in capsys.readouterr().out
    _main("experiments/train_toy_vlm.py")([
        "--steps", "2", "--batch", "4", "--layers", "1", "--hidden", "32", "--heads", "2", "--vision-layers", "1",
        "--vision-hidden", "32", "--val-n", "2", "--heldout-n", "2", "--eval-every", "2", "--stage-eval-every", "2",
        "--chunk", "8", "--counting-steps", "1", "--stage1-steps", "1", "--stage2-steps", "1", "--left-steps", "1",
        "--image-left-steps", "1", "--out", str(tmp_path / "toy"), "--report", str(tmp_path / "report")])
    assert (tmp_path / "toy" / "model.safetensors").is_file() and (tmp_path / "report" / "report.json").is_file()
    _main("experiments/method_ablation.py")(["--model", "tiny-llava", "--tasks", "counting", "--n", "4",
                                             "--resamples", "10", "--all-prompts", "--out", str(tmp_path / "results")])
    assert (tmp_path / "results" / "tiny-llava" / "method_ablation.md").is_file()
