"""The whole study on a tiny model: reproduce, resume, every experiment script writes its figure."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from modality_circuits.study.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny-llava", "--tasks", "counting", "sentiment", "--n", "8", "--resamples", "20", "--all-prompts"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    main(["reproduce", *ARGS, "--out", str(out)])
    return out / "tiny-llava"


def test_reproduce_writes_summary_report_and_figures(study_dir):
    summary = json.loads((study_dir / "summary.json").read_text())
    assert set(summary) == {"counting", "sentiment"}
    for key in ("accuracy", "minimal_faithful_fraction", "niou", "interchange", "backpatch_gain_points"):
        assert key in summary["counting"]
    assert set(summary["counting"]["niou"]) == {"D", "Q", "G"}
    assert {"low", "high", "value"} <= set(summary["counting"]["backpatch_gain_points"]["image"])
    report = (study_dir / "report.md").read_text()
    assert "## Back-patching" in report and "nIoU" in report
    for name in ("gallery", "position_effect", "faithfulness", "overlap", "interchange", "alignment", "backpatch",
                 "circuit_map"):
        assert (study_dir / f"{name}.png").stat().st_size > 1000
        assert (study_dir / f"{name}.pdf").stat().st_size > 1000


def test_rerun_reuses_finished_steps_and_redoes_missing_ones(study_dir):
    curve = study_dir / "counting" / "text" / "curve.json"
    overlap = study_dir / "sentiment" / "overlap.json"
    stamp = curve.stat().st_mtime_ns
    before = json.loads(overlap.read_text())
    overlap.unlink()  # as if the run had been interrupted before this step
    stale = study_dir / "sentiment" / "skipped.json"  # as if an earlier, weaker model had been left out
    stale.write_text(json.dumps({"reason": "too few correct pairs"}))
    main(["reproduce", *ARGS, "--out", str(study_dir.parent)])
    assert curve.stat().st_mtime_ns == stamp
    again = json.loads(overlap.read_text())
    again.pop("time"), before.pop("time")  # each computation stores its own time
    assert again == before
    assert not stale.exists()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "experiments").glob("[ft][ia][gb]_*.py")))
def test_experiment_script_writes_its_figure(script, study_dir, monkeypatch, capsys):
    args = ARGS if script != "fig_gallery.py" else ["--model", "tiny-llava", "--tasks", "counting"]
    monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(study_dir.parent)])
    runpy.run_path(str(ROOT / "experiments" / script), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()
    if script.startswith("fig_"):
        assert Path(printed[-1]).stat().st_size > 1000 and printed[-1].endswith(".png")
        return
    from modality_circuits.study.labels import task_name
    table = [line for line in printed if line.startswith("|")]  # the markdown table, as written to backpatch.md
    assert table == (study_dir / "backpatch.md").read_text().strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {tuple(c.strip() for c in r.strip("|").split("|")[:2]): [c.strip() for c in r.strip("|").split("|")]
            for r in table[2:]}
    before = next(i for i, c in enumerate(header) if c.startswith("accuracy before"))
    for task in ("counting", "sentiment"):  # one row per task and prompt modality, its numbers backpatch.json's
        data = json.loads((study_dir / task / "backpatch.json").read_text())
        for m in ("image", "text"):
            row, r = rows[(task_name(task), m)], data[m]
            assert row[2] == f"({r['config']['src']}, {r['config']['dst']}, {r['config']['window']})"
            assert row[before] == f"{100 * r['base']['value']:.1f}"
            assert row[before + 1] == f"{100 * r['patched']['value']:.1f}"
            assert row[before + 2].startswith(f"{r['gain_points']['value']:+.1f} [")
    assert len(rows) == 4


def test_interchange_margin_decides_what_the_report_can_read():
    from modality_circuits.analyses.interchange import MIN_MARGIN
    from modality_circuits.study.steps import interchange_margin as margin
    from modality_circuits.study.steps import interchange_readable as interpretable
    record = {"score": {"value": 0.7}, "visual_f_original": 0.9, "visual_f_random": [0.2, 0.4],
              "text_f_original": 0.8, "text_f_random": [0.78, 0.78]}
    assert margin(record) == pytest.approx(0.02)  # min(0.9 - 0.3, 0.8 - 0.78)
    assert not interpretable(record)
    record["text_f_random"] = [0.5, 0.6]
    assert margin(record) == pytest.approx(0.25) and MIN_MARGIN < 0.25 and interpretable(record)
    record["score"]["value"] = float("nan")
    assert not interpretable(record)


def test_report_marks_an_uninterpretable_interchange_score(study_dir, tmp_path):
    import shutil

    from modality_circuits.study.report import write_report
    folder = tmp_path / "copy"
    shutil.copytree(study_dir, folder)
    path = folder / "counting" / "interchange.json"
    ic = json.loads(path.read_text())
    ic["D"]["score"] = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    path.write_text(json.dumps(ic))
    report = write_report(folder, ["counting", "sentiment"], "tiny-llava", 20).read_text()
    section = report.split("## Cross-modal interchange")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| counting |"))
    assert row.split("|")[2].strip().startswith("n/a (ΔF") and "denominator is noise" in section
    assert "nan" not in report.lower()


def test_report_labels_clipping_fallbacks_and_accuracy_kinds(study_dir, tmp_path):
    """An nIoU clipped at 0 shows its unclipped value, a span scored from one unit type is marked with the reason,
    and the two accuracies (top-1; back-patching's answer set) are named where they are shown."""
    import shutil

    from modality_circuits.study.report import write_report
    folder = tmp_path / "copy"
    shutil.copytree(study_dir, folder)
    path = folder / "counting" / "overlap.json"
    ov = json.loads(path.read_text())
    ov["Q"]["niou"], ov["Q"]["niou_unclipped"] = {"value": 0.0, "low": 0.0, "high": 0.1}, -0.25
    ov["Q"].pop("niou_reason", None)  # both unit types present in Q: no mark
    ov["D"]["niou_reason"] = "no head of either circuit is in D: the score is the neuron nIoU alone"
    path.write_text(json.dumps(ov))
    report = write_report(folder, ["counting", "sentiment"], "tiny-llava", 20).read_text()
    section = report.split("## Overlap")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| counting |")).split("|")
    assert row[3].strip() == "0.00 [0.00, 0.10] (unclipped -0.25)" and row[2].strip().endswith("†")
    assert "counting, D: no head of either circuit is in D" in section
    accuracy = report.split("## Accuracy")[1].split("\n## ")[0]
    assert "| task | text (top-1) | image (top-1) |" in accuracy
    assert "accuracy before (answer set, %)" in report.split("## Back-patching")[1]


def test_readme_cli_lines_leave_the_committed_results_and_reproduce_reuses_them(tmp_path):
    """One writer per file: the README's per-step commands run the study's steps, reusing what reproduce wrote."""
    import re
    import shlex
    import shutil

    committed = ROOT / "results" / "toy"
    out = tmp_path / "results"
    shutil.copytree(committed, out / "toy", ignore=shutil.ignore_patterns(".cache"))
    # the report's organism section reads <out>/organism/*/recovery.json beside the model folder
    for path in (ROOT / "results" / "organism").glob("*/recovery.json"):
        (out / "organism" / path.parent.name).mkdir(parents=True)
        shutil.copy(path, out / "organism" / path.parent.name / path.name)
    lines = re.findall(r"^modality-circuits (?:discover|evaluate) --model toy .*$", (ROOT / "README.md").read_text(), re.M)
    assert len(lines) == 2
    data = [p.relative_to(committed) for p in committed.rglob("*") if p.suffix in (".json", ".safetensors", ".md")
            and ".cache" not in p.parts]
    for line in lines:
        main([*shlex.split(line)[1:], "--out", str(out)])
    main(["reproduce", "--model", "toy", "--out", str(out)])
    changed = [str(p) for p in data if (out / "toy" / p).read_bytes() != (committed / p).read_bytes()]
    assert not changed, f"files that differ from the committed results: {changed}"


def test_a_rerun_with_other_settings_recomputes_instead_of_mixing(study_dir):
    curve = study_dir / "counting" / "text" / "curve.json"
    assert json.loads(curve.read_text())["settings"]["resamples"] == 20
    other = [("30" if a == "20" else a) for a in ARGS]  # --resamples 30
    main(["reproduce", *other, "--out", str(study_dir.parent)])
    for path in study_dir.rglob("*.json"):
        if path.name not in ("summary.json",) and "training" not in path.parts:
            assert json.loads(path.read_text())["settings"]["resamples"] == 30, path
    main(["reproduce", *ARGS, "--out", str(study_dir.parent)])  # and back, for the other tests of this module
    assert json.loads(curve.read_text())["settings"]["resamples"] == 20


@pytest.mark.parametrize("bad, message", [(["--resamples", "0"], "resamples must be"), (["--n", "0"], "n must be"),
                                          (["--steps", "0"], "steps must be")])
def test_settings_are_refused_before_any_work(bad, message, tmp_path):
    with pytest.raises(SystemExit, match=f"^modality-circuits: error: {message}"):  # one line, no traceback
        main(["reproduce", "--model", "tiny-llava", *bad, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_a_killed_run_resumes_to_the_same_results(tmp_path, signal_name):
    """kill -9 (or Ctrl-C) mid-run leaves only finished files; the same command then gives the same summary.json."""
    import signal
    import subprocess
    import time

    args = [sys.executable, "-m", "modality_circuits", "reproduce", "--model", "tiny-llava", "--tasks", "counting",
            "--n", "8", "--resamples", "20", "--all-prompts"]
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    curve = tmp_path / "killed" / "tiny-llava" / "counting" / "text" / "curve.json"
    deadline = time.time() + 300
    while not curve.exists() and time.time() < deadline and proc.poll() is None:  # a finished step: mid-run
        time.sleep(0.05)
    assert curve.exists() and proc.poll() is None, "the run ended (or stalled) before the signal could be sent"
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate()
    assert not (tmp_path / "killed" / "tiny-llava" / "summary.json").exists()  # the signal stopped the run
    finished = [p for p in (tmp_path / "killed").rglob("*.json") if ".tmp" not in p.name]
    assert curve in finished and all(json.loads(p.read_text()) for p in finished), "a result file is half-written"
    if signal_name == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:  # a signal Python handles: exit code 130, a one-line message, and the temporary file is removed too
        assert proc.returncode == 130, err.decode()[-2000:]
        assert err.decode().strip().splitlines()[-1].startswith("interrupted:")
        assert not list((tmp_path / "killed").rglob("*.tmp*")), "a temporary file was left"
    subprocess.run([*args, "--out", str(tmp_path / "killed")], check=True, capture_output=True)
    whole, resumed = (json.loads((tmp_path / d / "tiny-llava" / "summary.json").read_text()) for d in ("whole", "killed"))
    assert resumed == whole


def test_an_unusable_out_folder_is_refused_before_any_work(tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit, match="is a file"):
        main(["reproduce", "--model", "tiny-llava", "--out", str(a_file / "sub")])


def test_force_recomputes_a_step_once_per_run(study_dir, tmp_path, monkeypatch):
    """--force: the curve, which overlap and interchange read again, is computed once per modality in a run."""
    import shutil

    from conftest import get_tiny

    from modality_circuits.study import steps

    shutil.copytree(study_dir, tmp_path / study_dir.name)
    calls, real = [], steps.faithfulness_curve
    monkeypatch.setattr(steps, "faithfulness_curve", lambda *a, **k: calls.append(a[2][0].prompt.modality) or real(*a, **k))
    s = steps.Study(get_tiny("llava"), out=str(tmp_path), tasks=("counting",), n=8, resamples=20, all_prompts=True,
                    force=True)
    assert s.dir == tmp_path / study_dir.name
    steps.run(s, ("curve", "overlap", "interchange"))
    assert sorted(calls) == ["image", "text"]
