"""summary.json and report.md: this run's numbers beside the study's reference numbers (docs/method.md section 12)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from ..analyses.interchange import MIN_MARGIN
from ..data.pairs import SPANS
from ..execution.store import atomic, nan_for_null, read_json, write_json
from .labels import task_name
from .steps import OURS, STEPS, interchange_margin, interchange_readable
from .validate import organism_section

# Reference results (docs/method.md section 12), for comparison in the report.
REFERENCE = {
    "circuit_fraction": {"text": 0.07, "image": 0.15},
    "interchange": {"Q": (0.7, 1.0), "G": (0.7, 1.0), "D": (-0.1, 0.1)},
    "alignment": "rises with depth (Qwen2-VL ≈0.25 → ≈0.65)",
    "backpatch_gain_points": {  # visual prompts, per task
        "Qwen2-VL-7B": {"counting": 4.2, "arithmetic": 9.4, "color_ordering": 0.6, "factual_recall": 0.3, "sentiment": 2.1},
        "Pixtral-12B": {"counting": 1.5, "arithmetic": 7.6, "color_ordering": 4.0, "factual_recall": 2.4, "sentiment": 17.8},
        "Gemma-3-12B": {"counting": 2.9, "arithmetic": 6.7, "color_ordering": 1.5, "factual_recall": 1.8, "sentiment": 5.5},
    },
}


def summarize(folder: Path, tasks) -> dict:
    """Per task: accuracy per modality, minimal faithful fraction, nIoU and interchange per span, back-patching gains."""
    out = {}
    for t in tasks:
        acc = {m: read_json(folder / t / m / "accuracy.json")["accuracy"] for m in ("text", "image")}
        curves = {m: read_json(folder / t / m / "curve.json") for m in ("text", "image")}
        ov, ic, bp, al = (nan_for_null(read_json(folder / t / f"{name}.json"))  # null: an undefined number
                          for name in ("overlap", "interchange", "backpatch", "alignment"))
        out[t] = {
            "accuracy": acc,
            "minimal_faithful_fraction": {m: curves[m]["minimal_fraction"] for m in curves},
            "faithfulness_undefined": {m: curves[m].get("undefined") for m in curves},  # the reason, or None
            "faithfulness_at_circuit": {m: nan_for_null(curves[m]["faithfulness_at_circuit"]) for m in curves},
            "niou": {s: {**ov[s]["niou"], "unclipped": ov[s].get("niou_unclipped", float("nan")),
                         "span_note": ov[s].get("niou_reason")} for s in SPANS},
            "interchange": {s: {**ic[s]["score"], "margin": interchange_margin(ic[s]), "interpretable": interchange_readable(ic[s])}
                            for s in SPANS},
            "backpatch_gain_points": {"image": bp["image"]["gain_points"], "text": bp["text"]["gain_points"]},
            "alignment_first_last": [al["per_layer"][0], al["per_layer"][-1]],
        }
    write_json(folder / "summary.json", out)
    return out


def _nanmean(values) -> float:
    """Mean over the finite values (nan when there are none)."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _niou(c: dict) -> str:
    """A span's nIoU with its interval, the unclipped value where clipping changed it, † where a reason is recorded."""
    text = _ci(c)
    u = c.get("unclipped")
    if u is not None and np.isfinite(u) and np.isfinite(c["value"]) and abs(u - c["value"]) >= 0.005:
        text += f" (unclipped {u:.2f})"
    return text + (" †" if c.get("span_note") else "")


def _ci(c: dict, scale: float = 1.0, fmt: str = ".2f") -> str:
    if not c.get("interpretable", True) and not np.isfinite(c["margin"]):
        return "n/a (F undefined)"
    if not c.get("interpretable", True):
        return f"n/a (ΔF {c['margin']:.2f})".replace("-0.00", "0.00")
    if not np.isfinite(c["value"]):
        return "undefined"
    if c.get("reason"):  # too many undefined resamples for an interval (circuits/stats.py `interval`)
        return f"{scale * c['value']:{fmt}} [n/a: {c['reason']}]"
    left_out = f"; {c['dropped']}/{c['resamples']} resamples undefined" if c.get("dropped") else ""
    return f"{scale * c['value']:{fmt}} [{scale * c['low']:{fmt}}, {scale * c['high']:{fmt}}{left_out}]"


def _pct(f) -> str:
    return "not reached" if f is None else f"{100 * f:.1f} %"


def write_report(folder: Path, tasks, model_name: str, resamples: int, skipped=()) -> Path:
    """report.md: results section with our numbers, the reference numbers, and where they agree."""
    s = summarize(folder, tasks)
    names = [task_name(t) for t in tasks]
    settings = read_json(folder / tasks[0] / "text" / "curve.json").get("settings", {})
    method = settings.get("method", {})
    changed = [f"{k} = {v}" for k, v in method.items() if v != getattr(OURS, k)]
    lines = [f"# Results on {model_name}", "",
             "Every number below is produced by `modality-circuits reproduce` (this folder's JSON files); "
             f"brackets are 95 % bootstrap confidence intervals over prompts ({resamples} resamples; resamples whose "
             "value is undefined are left out and counted, and above 1 % of them the interval is n/a). "
             "Reference numbers are those of the study (paper; docs/method.md section 12), measured on Qwen2-VL-7B, Pixtral-12B and Gemma-3-12B.",
             "", f"Prompt wording: {settings.get('wording', 'study')} (docs/method.md section 1). Method: "
             + ("ours (docs/method.md)." if not changed else "the reference code's choices " + ", ".join(changed)
                + " (docs/method.md section 11)."),
             *(["", "Left out: " + "; ".join(f"{task_name(t)} ({read_json(folder / t / 'skipped.json')['reason']})"
                                             for t in skipped) + "."] if skipped else []),
             "", "## Accuracy: the text–image gap", "",
             "Top-1 accuracy: the right answer is the model's greedy next token over the whole vocabulary "
             "(back-patching below counts accuracy over the task's answer set instead, as the study did).", "",
             "| task | text (top-1) | image (top-1) | gap (points) |", "|---|---|---|---|"]
    gaps = {}
    for t, n in zip(tasks, names):
        a = s[t]["accuracy"]
        gaps[t] = 100 * (a["text"]["value"] - a["image"]["value"])
        lines.append(f"| {n} | {_ci(a['text'])} | {_ci(a['image'])} | {gaps[t]:+.1f} |")
    positive = sum(g > 0 for g in gaps.values())
    reversed_ = [task_name(t) for t in tasks if gaps[t] < 0]
    lines += ["", f"The study found textual prompts answered better than visual ones on every task; here text is "
              f"ahead on {positive} of {len(tasks)} tasks"
              + (f", and the gap is reversed on {', '.join(reversed_)}." if reversed_ else "."), ""]

    threshold = read_json(folder / tasks[0] / "text" / "curve.json")["threshold"]
    lines += ["## Circuit size", "", f"Smallest fraction of heads and neurons with faithfulness F ≥ {threshold:g} on held-out pairs "
              "(F at that fraction in brackets). Reference: about 7 % (text) and 15 % (visual).", "",
              "| task | text | image |", "|---|---|---|"]
    bigger = 0
    for t, n in zip(tasks, names):
        f, fa, why = s[t]["minimal_faithful_fraction"], s[t]["faithfulness_at_circuit"], s[t]["faithfulness_undefined"]
        lines.append(f"| {n} | " + " | ".join("n/a (F undefined)" if why[m] else f"{_pct(f[m])} (F {_ci(fa[m])})"
                                             for m in ("text", "image")) + " |")
        bigger += (f["image"] or 1.0) > (f["text"] or 1.0)
    lines += [f"\nn/a: {task_name(t)}, {m}: {why}." for t in tasks for m, why in s[t]["faithfulness_undefined"].items()
              if why]
    lines += ["", f"Visual circuits are larger than textual ones on {bigger} of {len(tasks)} tasks "
              f"(reference: larger on all). ![faithfulness](faithfulness.png)", "",
              "Position effect: the exact change of LD when every node at a position is patched at once, averaged "
              "per span (the study summed per-component attributed effects instead: `<task>/<modality>/"
              "position_effect.json`, `per_component`). ![position effect](position_effect.png)", ""]

    lines += ["## Overlap of textual and visual circuits (nIoU)", "", "| task | D | Q | G |", "|---|---|---|---|"]
    order_ok = 0
    reasons = []
    for t, n in zip(tasks, names):
        v = s[t]["niou"]
        lines.append(f"| {n} | {_niou(v['D'])} | {_niou(v['Q'])} | {_niou(v['G'])} |")
        order_ok += v["D"]["value"] <= min(v["Q"]["value"], v["G"]["value"])
        reasons += [f"{n}, {sp}: {v[sp]['span_note']}" for sp in SPANS if v[sp].get("span_note")]
    lines += ["", "nIoU is clipped at 0; where the unclipped (IoU − b) / (1 − b) differs it is given in brackets "
              "(negative: less overlap than chance). A span's score is the mean of its head and neuron nIoU."]
    if reasons:  # the score of these spans is one unit type's nIoU, or undefined
        lines += ["", "†: " + "; ".join(reasons) + "."]
    lines += ["", f"Reference: little overlap in D, more in Q, most in G. Here D overlaps least on {order_ok} of "
              f"{len(tasks)} tasks. ![overlap](overlap.png)", ""]

    lines += ["## Cross-modal interchange", "", "| task | D | Q | G |", "|---|---|---|---|"]
    for t, n in zip(tasks, names):
        v = s[t]["interchange"]
        lines.append(f"| {n} | {_ci(v['D'])} | {_ci(v['Q'])} | {_ci(v['G'])} |")
    mean = {sp: _nanmean([v["value"] for t in tasks if (v := s[t]["interchange"][sp])["interpretable"]]) for sp in SPANS}
    if not all(s[t]["interchange"][sp]["interpretable"] for t in tasks for sp in SPANS):
        lines += ["", f"n/a: in at least one direction the span's own sub-circuit is less than {MIN_MARGIN} more faithful "
                  "than a random one of its size (ΔF = F(original) − F(random), the smaller direction shown), so the "
                  "score's denominator is noise; the mean below skips those cells. Both directions' F values are in "
                  "`<task>/interchange.json`."]
    shown = ", ".join(f"{sp} {mean[sp]:.2f}" if np.isfinite(mean[sp]) else f"{sp} n/a" for sp in SPANS)
    missing = [sp for sp in SPANS if not np.isfinite(mean[sp])]
    ordering = (f"the ordering cannot be checked (no interpretable {', '.join(missing)} score)" if missing
                else f"{'agrees' if mean['D'] < min(mean['Q'], mean['G']) else 'differs'} in ordering")
    lines += ["", f"Mean over tasks: {shown}. Reference: Q and G swap well (≈0.7–1.0), D does not (≈0) — "
              f"{ordering}. ![interchange](interchange.png)", ""]

    first_last = {t: s[t]["alignment_first_last"] for t in tasks}
    rises = sum(b > a for a, b in first_last.values())
    lines += ["## Image-to-text alignment across layers", "",
              "| task | first layer | last layer |", "|---|---|---|",
              *[f"| {n} | {first_last[t][0]:.2f} | {first_last[t][1]:.2f} |" for t, n in zip(tasks, names)], "",
              f"Reference: {REFERENCE['alignment']}. Here it rises on {rises} of {len(tasks)} tasks. "
              "![alignment](alignment.png)", ""]

    lines += ["## Back-patching", "", backpatch_table(folder, tasks),
              "Reference gains on visual prompts (points): " + "; ".join(
                  f"{m}: " + " ".join(f"{v:+.1f}" for v in g.values())
                  for m, g in REFERENCE["backpatch_gain_points"].items()) + " (counting, arithmetic, colour, factual, "
              "sentiment) — about a third of the text–image gap; textual controls gain much less.", ""]
    closed = []  # gain over the gap, both in answer-set accuracy points (the back-patching table's "before" columns)
    for t in tasks:
        bp = nan_for_null(read_json(folder / t / "backpatch.json"))
        gap = 100 * (bp["text"]["base"]["value"] - bp["image"]["base"]["value"])
        gain = s[t]["backpatch_gain_points"]["image"]["value"]
        if np.isfinite(gap) and gap > 1 and np.isfinite(gain):
            closed.append(f"{task_name(t)} {gain / gap:.0%}")
    lines += [("Share of the text–image gap closed here (answer-set accuracy, the table's \"before\" columns): "
               + ", ".join(closed) + ".") if closed else
              "No task has a positive answer-set text–image gap of more than one point, so no share of a gap is "
              "reported.",
              "![back-patching](backpatch.png)", ""]
    lines += organism_section(folder.parent / "organism")
    lines += ["## Time", "", "Wall-clock and CPU seconds of each step, summed over the tasks (and modalities) of this "
              "folder, as each record stores them (a step reused from an earlier run keeps that run's time).", "",
              time_table(folder, tasks), time_sentence(folder, tasks) or "", ""]
    path = folder / "report.md"
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines))
    return path


def backpatch_table(folder: Path, tasks) -> str:
    """Markdown table of back-patching results."""
    rows = ["| task | prompts | (src, dst, window) | accuracy before (answer set, %) | after | gain (points) |",
            "|---|---|---|---|---|---|"]
    for t in tasks:
        d = nan_for_null(read_json(folder / t / "backpatch.json"))
        if d.get("skipped"):  # refused for this model (analyses/backpatch.py `refusal`)
            rows.append(f"| {task_name(t)} | both | skipped: {d['skipped']} | | | |")
            continue
        for m in ("image", "text"):
            r = d[m]
            c = r["config"]
            g = r["gain_points"]
            rows.append(f"| {task_name(t)} | {m} | ({c['src']}, {c['dst']}, {c['window']}) | {100 * r['base']['value']:.1f} | "
                        f"{100 * r['patched']['value']:.1f} | {_ci(g, 1.0, '+.1f')} |")
    return "\n".join(rows) + "\n"


def step_times(folder: Path, tasks=None) -> dict[str, dict[str, float]]:
    """{step: {"wall_s", "cpu_s"}} summed over the step records (<task>/[<modality>/]<step>.json) of `tasks`
    (default: every task folder) that store a time; steps without one are left out."""
    out = {}
    for task in tasks or sorted(p.name for p in Path(folder).iterdir() if p.is_dir()):
        for step in STEPS:
            for path in sorted((Path(folder) / task).glob(f"**/{step}.json")):
                spent = read_json(path).get("time")
                if spent:
                    total = out.setdefault(step, {"wall_s": 0.0, "cpu_s": 0.0})
                    total["wall_s"] += spent["wall_s"]
                    total["cpu_s"] += spent["cpu_s"]
    return out


def time_table(folder: Path, tasks) -> str:
    """Markdown table of `step_times`, with the total."""
    times = step_times(folder, tasks)
    rows = ["| step | wall clock (s) | CPU (s) |", "|---|---|---|"]
    rows += [f"| {step} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} |" for step, t in times.items()]
    rows.append(f"| total | {sum(t['wall_s'] for t in times.values()):.1f} | "
                f"{sum(t['cpu_s'] for t in times.values()):.1f} |")
    return "\n".join(rows) + "\n"


TIME_SENTENCE = re.compile(r"The study's steps took \d+ s \(wall clock; \d+ s of CPU\) for \d+ tasks?, summed over "
                           r"the step records\.")


def time_sentence(folder: Path, tasks=None) -> str | None:
    """The sentence the docs quote for the study's time, from the step records (None when none stores a time).

    python -m modality_circuits.study.report results/toy  prints it for the committed run."""
    times = step_times(folder, tasks)
    if not times:
        return None
    n = len(tasks) if tasks else sum(1 for p in Path(folder).iterdir() if p.is_dir() and any(p.glob("**/curve.json")))
    wall, cpu = (sum(t[k] for t in times.values()) for k in ("wall_s", "cpu_s"))
    return (f"The study's steps took {wall:.0f} s (wall clock; {cpu:.0f} s of CPU) for {n} task{'s' * (n != 1)}, "
            "summed over the step records.")


if __name__ == "__main__":
    print(time_sentence(Path(sys.argv[1])) or f"no step record in {sys.argv[1]} stores a time")
