"""Recovery benchmark: run the ordinary study on the organism (zoo/planted.py) and score it against the truth.

`validate(seed, control, out)` runs the study's own steps (accuracy, attribution, faithfulness curve, overlap,
interchange, alignment, back-patching) on `organism(seed, control)`, with no organism-specific code path:
only two ordinary settings are chosen, a fraction grid fine enough to resolve circuits of a few nodes (every
0.04 % up to 4 %) and the number of pairs. It then compares each discovered circuit (the smallest faithful
fraction) with the planted nodes, reads each finding from the steps' JSON files, and writes
<out>/recovery.json (docs/validation.md).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..circuits.circuit import Circuit
from ..execution.store import read_json, write_json

#: The curve's fractions: every 0.04 % up to 4 % (the organism's circuits are 0.5-2.5 % of the nodes).
FRACTIONS = tuple(round(4e-4 * i, 6) for i in range(1, 101))
FINDINGS = ("visual_larger", "overlap_D_below_G", "overlap_Q_between", "interchange_G_above_D", "alignment_rises",
            "backpatch_gain")


def check_tasks(tasks) -> tuple[str, ...]:
    """The organism's tasks among `tasks`, or a clear error naming the ones it has."""
    from ..zoo.planted import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"the organism has no task {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"its tasks: {', '.join(TASKS)}")
    return tuple(tasks)


def _interval(value: float, low: float, high: float) -> dict:
    return {"value": float(value), "ci": [float(low), float(high)]}


def _difference(a: dict, b: dict) -> dict:
    """a − b with the interval [a.low − b.high, a.high − b.low] (conservative: both intervals at their ends)."""
    return _interval(a["value"] - b["value"], a["low"] - b["high"], a["high"] - b["low"])


def _both(a: dict, b: dict) -> dict:
    """Both differences above zero: the smaller value, and the interval of the smaller one at each end."""
    return _interval(min(a["value"], b["value"]), min(a["ci"][0], b["ci"][0]), min(a["ci"][1], b["ci"][1]))


def _fraction_interval(curve: dict) -> dict:
    """The minimal faithful fraction with the range it takes as F moves within its per-fraction intervals: from the
    first fraction whose upper bound reaches the threshold to the first whose lower bound does."""
    f, thr = curve["fractions"], curve["threshold"]

    def first(key: str) -> float:
        return next((x for x, c in zip(f, curve["ci"]) if c[key] is not None and c[key] >= thr), np.nan)

    value = curve["minimal_fraction"] if curve["minimal_fraction"] is not None else np.nan
    return {"value": value, "low": first("high"), "high": first("low")}


def findings_of(folder: Path, task: str) -> dict:
    """Each finding's value and interval for one task, read from the study's JSON files."""
    curves = {m: read_json(folder / task / m / "curve.json") for m in ("text", "image")}
    ov, ic = read_json(folder / task / "overlap.json"), read_json(folder / task / "interchange.json")
    al, bp = read_json(folder / task / "alignment.json"), read_json(folder / task / "backpatch.json")

    def nan(c: dict) -> dict:
        return {k: (np.nan if c[k] is None else c[k]) for k in ("value", "low", "high")}

    gain = nan(bp["image"]["gain_points"])  # accuracy points
    niou = {s: nan(ov[s]["niou"]) for s in ("D", "Q", "G")}
    return {
        "visual_larger": _difference(_fraction_interval(curves["image"]), _fraction_interval(curves["text"])),
        "overlap_D_below_G": _difference(niou["G"], niou["D"]),
        "overlap_Q_between": _both(_difference(niou["Q"], niou["D"]), _difference(niou["G"], niou["Q"])),
        "interchange_G_above_D": _difference(nan(ic["G"]["score"]), nan(ic["D"]["score"])),
        "alignment_rises": _difference(nan(al["ci"][-1]), nan(al["ci"][0])),
        "backpatch_gain": _interval(gain["value"], gain["low"], gain["high"]),
    }


def recovery(circuit: Circuit, planted: tuple) -> dict:
    """Precision and recall of a discovered circuit's nodes (heads and neurons together) against planted masks."""
    found = int(circuit.heads.sum() + circuit.neurons.sum())
    true = int(planted[0].sum() + planted[1].sum())
    hit = int((circuit.heads & planted[0]).sum() + (circuit.neurons & planted[1]).sum())
    return {"precision": hit / found if found else 0.0, "recall": hit / true if true else 0.0, "planted": true,
            "found": found, "planted_heads": int(planted[0].sum()), "found_heads": int(circuit.heads.sum())}


def validate(seed: int, control: bool = False, out: str = "results/organism", *, tasks=None, n: int = 96,
             resamples: int = 1000, counterfactuals: str = "minimal", progress: bool = True) -> dict:
    """Run the ordinary study on organism(seed, control) and write <out>/recovery.json; returns its record."""
    from ..execution.store import check_writable
    from ..zoo.planted import TASKS, check_seed, organism
    from . import steps

    seed = check_seed(seed)
    tasks = check_tasks(tuple(tasks or TASKS))
    steps.check_settings(tasks, n=n, steps=5, resamples=resamples, counterfactuals=counterfactuals)
    check_writable(Path(out))
    start, cpu = time.perf_counter(), time.process_time()
    model, truth = organism(seed, control=control)
    study = steps.Study(model, out=str(out), tasks=tasks, n=n, seed=seed, resamples=resamples, fractions=FRACTIONS,
                        counterfactuals=counterfactuals)
    steps.run(study, ("accuracy", "curve", "overlap", "interchange", "alignment", "backpatch"))
    record = {"seed": seed, "control": bool(control), "tasks": {}, "findings": {}}
    per_task = {}
    for task in tasks:
        entry = {}
        for modality in ("text", "image"):
            circuit = steps.load_circuit(study, task, modality)
            length = circuit.heads.shape[-1]
            if length != truth.nodes[task][modality]["length"]:
                raise RuntimeError(f"{task}/{modality}: pairs of {length} tokens, the truth is for "
                                   f"{truth.nodes[task][modality]['length']}")
            entry[modality] = recovery(circuit, truth.masks(task, modality, length))
        found = findings_of(study.dir, task)
        per_task[task] = {name: {"planted": bool(truth.findings[task][name]),
                                 "detected": bool(found[name]["ci"][0] > 0),
                                 "excludes_zero": bool(found[name]["ci"][0] > 0 or found[name]["ci"][1] < 0),
                                 **found[name]} for name in FINDINGS}
        ov = read_json(study.dir / task / "overlap.json")
        niou = {s: {"value": ov[s]["niou"]["value"], "ci": [ov[s]["niou"]["low"], ov[s]["niou"]["high"]]}
                for s in ("D", "Q", "G")}
        record["tasks"][task] = {**entry, "findings": per_task[task], "overlap_niou": niou}
    for name in FINDINGS:
        rows = [per_task[t][name] for t in tasks]
        planted = [r for r in rows if r["planted"]]
        shown = planted or rows  # planted: over the tasks it was planted in (absent: over all tasks)
        record["findings"][name] = {
            "planted": bool(planted),
            # planted: detected in every task it was planted in (the hull's lower end above 0); absent: in any task
            "detected": all(r["detected"] for r in planted) if planted else any(r["detected"] for r in rows),
            "value": float(np.mean([r["value"] for r in shown])),
            "ci": [float(min(r["ci"][0] for r in shown)), float(max(r["ci"][1] for r in shown))],
            "tasks_detected": [t for t, r in zip(tasks, rows) if r["detected"]],
            # two-sided: the tasks whose interval excludes zero in either direction (on the control: should be none)
            "tasks_excluding_zero": [t for t, r in zip(tasks, rows) if r["excludes_zero"]],
        }
    record["time"] = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    record["settings"] = {"n": n, "resamples": resamples, "counterfactuals": counterfactuals,
                          "fractions": [FRACTIONS[0], FRACTIONS[-1], len(FRACTIONS)],
                          "organism": truth.settings, "study_folder": study.dir.name}
    write_json(Path(out) / "recovery.json", record)
    return record


def table(record: dict) -> str:
    """A short plain-text table of recovery.json."""
    lines = [f"organism seed {record['seed']}{' (control)' if record['control'] else ''}",
             f"{'task':16s}{'modality':10s}{'precision':>10s}{'recall':>8s}{'planted':>9s}{'found':>7s}"]
    for task, entry in record["tasks"].items():
        for m in ("text", "image"):
            r = entry[m]
            lines.append(f"{task:16s}{m:10s}{r['precision']:10.2f}{r['recall']:8.2f}{r['planted']:9d}{r['found']:7d}")
    lines.append(f"{'finding':24s}{'planted':>8s}{'detected':>9s}  value [95 % interval]")
    for name, f in record["findings"].items():
        lines.append(f"{name:24s}{f['planted']!s:>8s}{f['detected']!s:>9s}  {f['value']:.3f} "
                     f"[{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]{_excludes(f)}")
    return "\n".join(lines)


def _excludes(f: dict) -> str:
    """A note when an absent finding's interval excludes zero in either direction (two-sided)."""
    tasks = f["tasks_excluding_zero"]
    return f" (excludes 0 in {', '.join(tasks)})" if tasks and not f["planted"] else ""


def _records(folder: Path) -> list[dict]:
    return sorted((read_json(p) for p in Path(folder).glob("*/recovery.json")),
                  key=lambda r: (_name(r).endswith("p')"), r["seed"], r["control"]))


def _name(record: dict) -> str:
    """seed S [control] [(random p')]: a row's organism and, when not minimal, how its counterfactuals were drawn."""
    drawn = record.get("settings", {}).get("counterfactuals", "minimal")
    return (f"seed {record['seed']}" + (" control" if record["control"] else "")
            + (f" ({drawn} p')" if drawn != "minimal" else ""))


def organism_tables(folder: Path) -> list[str]:
    """Markdown tables of <folder>/*/recovery.json: precision and recall per task and modality, then the findings."""
    records = _records(folder)
    lines = ["| organism | task | modality | precision | recall | planted | found |", "|---|---|---|---|---|---|---|"]
    for r in records:
        name = _name(r)
        for task, entry in r["tasks"].items():
            for m in ("text", "image"):
                e = entry[m]
                lines.append(f"| {name} | {task} | {m} | {e['precision']:.2f} | {e['recall']:.2f} | {e['planted']} | "
                             f"{e['found']} |")
    lines += ["", "| organism | " + " | ".join(FINDINGS) + " |", "|---|" + "---|" * len(FINDINGS)]
    for r in records:
        name = _name(r)
        cells = [f"{'planted' if f['planted'] else 'absent'}, {'detected' if f['detected'] else 'not detected'}: "
                 f"{f['value']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]{_excludes(f)}"
                 for f in (r["findings"][k] for k in FINDINGS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def organism_section(folder: Path) -> list[str]:
    """The report's "Does the method recover planted circuits?" section from <folder>/*/recovery.json (none: [])."""
    if not _records(folder):
        return []
    return ["## Does the method recover planted circuits?", "",
            ("The same pipeline on a model organism whose circuits are known by construction, and on its control "
             "(same sizes, no planted finding): `modality-circuits validate` (docs/validation.md). Precision and "
             "recall of the discovered circuit's nodes against the planted ones; a finding is detected when its 95 % "
             "interval lies above zero; an absent finding whose interval excludes zero in either direction is marked "
             "so."), "", *organism_tables(folder), ""]
