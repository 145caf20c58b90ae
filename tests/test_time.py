"""Step times in the records, the report's time table, and the docs' time sentence generated from the committed run."""
import json
from pathlib import Path

from modality_circuits.study.report import TIME_SENTENCE, _ci, step_times, time_sentence, time_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _record(path: Path, wall: float, cpu: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": {}, "time": {"wall_s": wall, "cpu_s": cpu}}))


def test_step_times_sum_every_record_of_a_step(tmp_path):
    _record(tmp_path / "a" / "text" / "curve.json", 1.25, 1.0)
    _record(tmp_path / "a" / "image" / "curve.json", 2.5, 2.0)
    _record(tmp_path / "b" / "text" / "curve.json", 4.0, 3.5)
    _record(tmp_path / "a" / "overlap.json", 0.5, 0.25)
    (tmp_path / "a" / "skipped.json").write_text(json.dumps({"reason": "x"}))  # not a step: left out
    assert step_times(tmp_path) == {"curve": {"wall_s": 7.75, "cpu_s": 6.5}, "overlap": {"wall_s": 0.5, "cpu_s": 0.25}}
    assert step_times(tmp_path, ["a"])["curve"] == {"wall_s": 3.75, "cpu_s": 3.0}
    table = time_table(tmp_path, ["a", "b"])
    assert "| curve | 7.8 | 6.5 |" in table and "| total | 8.2 | 6.8 |" in table
    assert time_sentence(tmp_path) == ("The study's steps took 8 s (wall clock; 7 s of CPU) for 2 tasks, summed over "
                                       "the step records.")
    (tmp_path / "none" / "c").mkdir(parents=True)
    assert time_sentence(tmp_path / "none") is None  # no record stores a time: nothing to quote


def test_the_docs_quote_the_time_of_the_committed_run():
    """Every time sentence in README.md and docs/*.md is the one generated from results/toy/; none while the
    committed records store no time."""
    want = time_sentence(ROOT / "results" / "toy")
    quoted = [(doc.name, m.group()) for doc in DOCS for m in TIME_SENTENCE.finditer(doc.read_text())]
    if want is None:
        assert not quoted, f"{quoted}: results/toy/ stores no step time to back these"
    else:
        assert quoted and all(q == want for _, q in quoted), f"quoted {quoted}, generated {want!r}"


def test_report_cells_show_left_out_resamples_and_void_intervals():
    ci = {"value": 0.5, "low": 0.25, "high": 0.75, "dropped": 0, "resamples": 1000}
    assert _ci(ci) == "0.50 [0.25, 0.75]"
    assert _ci({**ci, "dropped": 3}) == "0.50 [0.25, 0.75; 3/1000 resamples undefined]"
    void = {**ci, "low": float("nan"), "high": float("nan"), "dropped": 40, "reason": "40/1000 resamples undefined"}
    assert _ci(void) == "0.50 [n/a: 40/1000 resamples undefined]"
    assert _ci({"value": 0.5, "low": 0.25, "high": 0.75}) == "0.50 [0.25, 0.75]"  # a record written before the count
