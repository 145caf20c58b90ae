"""The numbers of README.md and docs/*.md that a command produced, generated from the committed files.

Every block between `<!-- numbers:NAME -->` and `<!-- /numbers -->` is rewritten from its source:
  short-names       modality_circuits.zoo.SHORT_NAMES
  toy-training      results/toy/training/report.json   (python experiments/train_toy_vlm.py)
  toy-results       results/toy/summary.json           (modality-circuits reproduce --model toy)
  scale-ratios      results/scale/*.json               (python experiments/bench_scale.py --json ...)
  scale-projection  results/scale/*.json               (the projection stored with the measurements)
  toy-time          results/toy/<task>/**/*.json       (the step times every record stores)
  organism-recovery results/organism/*/recovery.json   (modality-circuits validate --seed S [--control])
  organism-seeds    results/organism-seeds/*/recovery.json (modality-circuits validate --seed S, more seeds; with
                    --tasks counting --counterfactuals random into seed-S-random)
  reproducibility   results/reproducibility/bench.json (python experiments/bench_reproducibility.py --json ...)
  ndif-e2e          results/ndif/e2e.json              (MC_CI_REMOTE=1 bash .ci/remote-server)
  study-share       results/toy/bench_study.json       (python experiments/bench_study.py --json ...)
  teach             results/teach/*.json               (modality-circuits teach: the model folder's teach_report.json)
  budget-linear     results/budget/linear_qwen3_5.json (python experiments/budget_linear.py --json ...)

    python scripts/docs_numbers.py           # rewrite the blocks in place
    python scripts/docs_numbers.py --check   # exit 1, naming the stale blocks, when a file differs

tests/test_docs.py runs the check, so a regenerated result file fails the tests until this is run.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- numbers:([\w-]+) -->\n)(.*?)(<!-- /numbers -->)", re.S)
TASK_NAMES = {"counting": "counting", "arithmetic": "arithmetic", "color_ordering": "colour ordering",
              "factual_recall": "factual recall", "sentiment": "sentiment"}
GIB = 2**30


def documents() -> list[Path]:
    """README.md and every Markdown page of docs/ (the results/ link under docs/ left out)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _read(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _ci(c: dict, scale: float = 1.0) -> str:
    """value [low, high]; a missing interval prints the value alone."""
    if c.get("value") is None:
        return "undefined"
    if not c.get("interpretable", True):
        return f"n/a (margin {c['margin']:.2f})"
    v, lo, hi = (scale * c[k] if c.get(k) is not None else None for k in ("value", "low", "high"))
    return f"{v:.2f}" if lo is None or lo == hi == v else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def short_names() -> str:
    from modality_circuits.zoo import SHORT_NAMES

    return "\n".join(["| short name | hub id |", "|---|---|"]
                     + [f"| `{name}` | {hub} |" for name, hub in SHORT_NAMES.items()])


def toy_training() -> str:
    r = _read("results/toy/training/report.json")
    lines = [f"{r['n_params']:,} parameters ({r['model_mb']:.1f} MB of safetensors), {r['steps_done']} training steps;"
             f" {r['heldout_n']} held-out prompts per task and modality.", "",
             "| task | text | image | gap (text − image) |", "|---|---|---|---|"]
    for task, name in TASK_NAMES.items():
        cells = []
        for m in ("text", "image"):
            h = r["heldout"][f"{task}/{m}"]
            lo, hi = h["ci"]
            cells.append(f"{h['acc']:.3f}" if lo == hi == h["acc"] else f"{h['acc']:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {r['gap'][task]:+.3f} |")
    return "\n".join(lines)


def toy_results() -> str:
    s = _read("results/toy/summary.json")
    pct = lambda f: "not reached" if f is None else f"{100 * f:.0f} %"  # noqa: E731
    lines = ["| task | accuracy text | accuracy image | circuit size text / image | nIoU G | interchange Q | interchange G"
             " | back-patching gain (image, points) |", "|---|---|---|---|---|---|---|---|"]
    for task in s:
        t = s[task]
        f = t["minimal_faithful_fraction"]
        lines.append(f"| {TASK_NAMES.get(task, task)} | {_ci(t['accuracy']['text'])} | {_ci(t['accuracy']['image'])}"
                     f" | {pct(f['text'])} / {pct(f['image'])} | {_ci(t['niou']['G'])} | {_ci(t['interchange']['Q'])}"
                     f" | {_ci(t['interchange']['G'])} | {_ci(t['backpatch_gain_points']['image'])} |")
    return "\n".join(lines)


def _runs() -> list[tuple[str, dict, str, dict]]:
    """(file, its args, model, that model's record) of every results/scale/*.json, in file order."""
    out = []
    for path in sorted((ROOT / "results" / "scale").glob("*.json")):
        report = json.loads(path.read_text())
        for name, record in report["models"].items():
            out.append((f"results/scale/{path.name}", report["args"], name, record))
    return out


def _growth(step: dict) -> float:
    return step["peak_bytes"] - step["base_bytes"]


def _ratio(steps: dict, step: str, key: str) -> float:
    if key == "time":
        return min(steps[step]["cpu_s"]) / min(steps[f"{step}_floor"]["cpu_s"])
    return _growth(steps[step]) / _growth(steps[f"{step}_floor"])


def _spread(times: list[float]) -> str:
    return f"{100 * (max(times) - min(times)) / min(times):.0f} %" if len(times) > 1 else "1 run"


def scale_ratios() -> str:
    lines = ["| model (image tokens) | run | `attribute` time × floor | `attribute` memory × floor | ablation time × floor"
             " | ablation memory × floor | file |", "|---|---|---|---|---|---|---|"]
    for file, args, name, record in _runs():
        st = record["steps"]
        a, af = st["attribute"], st["attribute_floor"]
        lines.append(
            f"| {record['dims']['hub_id']} width ({a['image_tokens']}) | {args['pairs']} pair(s), {args['layers']} decoder"
            f" layer(s), k = {args['steps']}, {args['repeats']} repeat(s) | {_ratio(st, 'attribute', 'time'):.2f}×"
            f" ({min(a['cpu_s']):.1f} s vs {min(af['cpu_s']):.1f} s; spread {_spread(a['cpu_s'])}, {_spread(af['cpu_s'])})"
            f" | {_ratio(st, 'attribute', 'memory'):.2f}× (+{_growth(a) / GIB:.2f} vs +{_growth(af) / GIB:.2f} GiB)"
            f" | {_ratio(st, 'ablation', 'time'):.2f}× | {_ratio(st, 'ablation', 'memory'):.2f}× | `{file}` |")
    return "\n".join(lines)


def scale_projection() -> str:
    lines = ["| model | from | weights | IG chunk → projected peak | forward chunk → projected peak | whole study"
             " (back-patching) |", "|---|---|---|---|---|---|"]
    for file, args, name, record in _runs():
        p = record["projection"]
        hours = p["hours"]
        lines.append(f"| {record['dims']['hub_id']} | {args['pairs']} pair(s), {args['layers']} layer(s) |"
                     f" {p['weights_gb']:.1f} GB | {p['budget_ig_rows']} rows → {p['peak_gb_ig']:.1f} GB |"
                     f" {p['budget_fwd_rows']} rows → {p['peak_gb_fwd']:.1f} GB |"
                     f" {sum(hours.values()):.2f} GPU-h ({hours['backpatch']:.2f}) |")
    return "\n".join(lines)


def toy_time() -> str:
    from modality_circuits.study.report import time_sentence

    return time_sentence(ROOT / "results" / "toy") or "No committed record stores its time."


def organism_recovery() -> str:
    from modality_circuits.study.validate import organism_tables

    times = []
    for path in sorted((ROOT / "results" / "organism").glob("*/recovery.json")):
        r = json.loads(path.read_text())
        if r.get("time"):
            times.append(f"seed {r['seed']}{' control' if r['control'] else ''} {r['time']['wall_s']:.0f} s wall, "
                         f"{r['time']['cpu_s']:.0f} s CPU")
    return "\n".join([*organism_tables(ROOT / "results" / "organism"), "",
                      "Time of each invocation (a rerun reuses the finished steps): " + "; ".join(times) + "."])


def organism_seeds() -> str:
    from modality_circuits.study.validate import organism_tables

    return "\n".join(organism_tables(ROOT / "results" / "organism-seeds"))


def reproducibility() -> str:
    r = _read("results/reproducibility/bench.json")
    mode = {"strict": "strict (default)", "off": "off"}
    lines = ["| MKL mode | model | modality | against 1 thread, canonical chunks | heads | neurons | ablation LDs |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {mode[d['mode']]} | {d['model']} | {d['modality']} | {d['against 1 thread']} | {d['heads']:.1e} | "
              f"{d['neurons']:.1e} | {d['LDs']:.1e} |" for d in r["differences"]]
    cpu = {m: {k: f"{min(v):.2f}–{max(v):.2f} s" for k, v in t.items()} for m, t in r["cpu_s"].items()}
    lines += ["", f"CPU time, one thread, {r['args']['repeats']} repeats: `attribute` (36 toy image pairs, k = 5) "
              f"{cpu['strict']['attribute']} with the strict mode, {cpu['off']['attribute']} without; 24 ablated circuits "
              f"on 36 pairs {cpu['strict']['ablate']} and {cpu['off']['ablate']}."]
    return "\n".join(lines)


def ndif_e2e() -> str:
    r = _read("results/ndif/e2e.json")
    rows = [row for m in r["models"] for row in m["rows"]]
    first = [m["rows"][0]["remote_s"] for m in r["models"]]
    later = [row["remote_s"] for m in r["models"] for row in m["rows"][1:]]
    families = ", ".join("the toy" if "toy" in m["model"] else f"tiny {m['family']}" for m in r["models"])
    return "\n".join([
        f"`results/ndif/e2e.json` ({r['date'][:10]}; machine: {r['machine']}):", "",
        "| | |", "|---|---|",
        f"| remote runs | {len(rows)} ({len(rows) // len(r['models'])} algorithms × {families}), {r['failed']} failed |",
        f"| largest local-vs-remote difference | {r['max_abs_diff']:g} (float32 weights on both sides) |",
        f"| install (server venv) | {r['install_s']:.0f} s |",
        f"| start (redis, S3, Ray, controller, API) | {r['start_s']:.0f} s |",
        f"| comparison | {r['seconds']:.0f} s; the first request of each model, which deploys it, {min(first):.0f} to "
        f"{max(first):.0f} s, later ones {min(later):.1f} to {max(later):.1f} s |", "",
        f"Server: {r['server']}; client: " + ", ".join(f"{k} {v}" for k, v in r["client"].items()) + "."])


def study_share() -> str:
    r = _read("results/toy/bench_study.json")
    a = r["args"]

    def spread(values: list[float], fmt: str = ".1f") -> str:
        return f"{sorted(values)[len(values) // 2]:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

    cells = {k: spread([x[k] for x in r["runs"]]) for k in ("cpu", "wall", "model_cpu")}
    share = {k: spread([100 * (1 - x[f"model_{k}"] / x[k]) for x in r["runs"]]) for k in ("cpu", "wall")}
    return "\n".join([
        f"Model `{a['model']}`, task {a['task']}, n = {a['n']}, {a['resamples']} resamples, {len(r['runs'])} repeats, "
        f"{r['threads']} thread(s), load average {r['load_average']} (median (min–max)):", "",
        "| steps, CPU s | steps, wall s | inside the model, CPU s | outside the model, % of CPU | % of wall |",
        "|---|---|---|---|---|",
        f"| {cells['cpu']} | {cells['wall']} | {cells['model_cpu']} | {share['cpu']} | {share['wall']} |"])


def teach() -> str:
    rows = ["| task | words added | steps (kept) | wall | CPU | held-out accuracy text / image | built-in tasks before → after |",
            "|---|---|---|---|---|---|---|"]
    for path in sorted((ROOT / "results" / "teach").glob("*.json")):
        r = json.loads(path.read_text())
        acc = r["test_accuracy"]
        rows.append(f"| `{r['task']}` | {', '.join(r['words_added']) or 'none (the toy knows them)'} | {r['steps']} "
                    f"({r['chosen_step']}) | {r['train_wall_s']:.0f} s | {r['train_cpu_s']:.0f} s | {acc['text']:.2f} / "
                    f"{acc['image']:.2f} ({r['n_test']} each) | {r['builtin_accuracy_before']:.3f} → "
                    f"{r['builtin_accuracy_after']:.3f} ({r['settings']['n_builtin']} per task and modality) |")
    return "\n".join(rows)


def budget_linear() -> str:
    r = _read("results/budget/linear_qwen3_5.json")
    lines = ["| per-row bytes of | measured | measured / model without the linear-layer terms | with them |",
             "|---|---|---|---|"]
    for p in r["package"]:
        what = f"{'IG' if p['kind'] == 'ig' else 'forward'} row, {p['layers']} layers"
        lines.append(f"| {what} ({p['source']}) | {p['measured_bytes'] / 1e6:.1f} MB | {p['ratio_without']:.2f}× |"
                     f" {p['ratio_with']:.2f}× |")
    layer = ", ".join(f"T = {x['T']} {'forward' if x['mode'] == 'fwd' else 'backward'} ×{x['calls']}: "
                      f"{x['units']:.1f}" for x in r["layer"])
    return "\n".join(lines + ["", f"One Gated DeltaNet layer alone, per row, in ({r['chunk']}-padded T, value width) "
                               f"float32 tensors: {layer}; the model counts {r['live']} live and {r['kept']} kept per "
                               "layer."])


GENERATORS = {"short-names": short_names, "toy-training": toy_training, "toy-results": toy_results,
              "scale-ratios": scale_ratios, "scale-projection": scale_projection, "toy-time": toy_time,
              "organism-recovery": organism_recovery, "reproducibility": reproducibility,
              "ndif-e2e": ndif_e2e, "study-share": study_share, "teach": teach,
              "budget-linear": budget_linear, "organism-seeds": organism_seeds}


def render(text: str, where: str = "") -> str:
    """`text` with every numbers block regenerated; an unknown block name is an error naming it."""
    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in GENERATORS:
            raise KeyError(f"{where}: unknown numbers block {name!r}; known: {', '.join(GENERATORS)}")
        return f"{m.group(1)}{GENERATORS[name]()}\n{m.group(4)}"
    return BLOCK.sub(one, text)


def stale() -> list[str]:
    """Documents whose committed blocks differ from the generated ones."""
    return [str(p.relative_to(ROOT)) for p in documents() if render(p.read_text(), p.name) != p.read_text()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"{name}: numbers blocks differ from the result files; run python scripts/docs_numbers.py")
        return 1 if bad else 0
    for path in documents():
        text = path.read_text()
        new = render(text, path.name)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
