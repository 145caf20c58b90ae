"""Method ablation: the study's headline findings with our method, with the reference code's, and with each single
reference choice switched on alone (docs/method.md section 11), with bootstrap intervals.

    python experiments/method_ablation.py --model toy          # -> results/toy/method_ablation.{md,png}

Each variant is a resumable study under results/<model>/.cache/method_ablation/<variant>/ (steps: curve,
overlap, interchange, backpatch); the table and figure read their JSON files.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from modality_circuits.analyses.interchange import MIN_MARGIN
from modality_circuits.data.pairs import SPANS
from modality_circuits.execution.store import atomic, nan_for_null, read_json
from modality_circuits.study import steps
from modality_circuits.study.labels import task_name
from modality_circuits.tasks import TASKS
from modality_circuits.zoo import load_model

STEPS = ("curve", "overlap", "interchange", "backpatch")
VARIANTS = {"ours": steps.OURS, "reference": steps.REFERENCE,
            **{f"only {f.name}": dataclasses.replace(steps.OURS, **{f.name: getattr(steps.REFERENCE, f.name)})
               for f in dataclasses.fields(steps.Method)}}


def findings(folder: Path, task: str) -> dict:
    """The headline numbers of one task: circuit fraction per modality, nIoU and interchange per span, back-patching
    gain on visual prompts (each a CI dict, or a fraction)."""
    curve = {m: read_json(folder / task / m / "curve.json") for m in ("text", "image")}
    overlap = nan_for_null(read_json(folder / task / "overlap.json"))
    inter = nan_for_null(read_json(folder / task / "interchange.json"))
    gain = nan_for_null(read_json(folder / task / "backpatch.json"))["image"]["gain_points"]
    return {"fraction": {m: curve[m]["circuit_fraction"] for m in curve},
            "niou": {s: overlap[s]["niou"] for s in SPANS},
            "interchange": {s: {**inter[s]["score"], "margin": steps.interchange_margin(inter[s]),
                                "interpretable": steps.interchange_readable(inter[s])} for s in SPANS},
            "gain": gain}


def _ci(c: dict) -> str:
    """A CI dict as text; an interchange score whose denominator is noise reads n/a with its margin ΔF."""
    if not c.get("interpretable", True):
        return f"n/a (ΔF {c['margin']:.2f})".replace("-0.00", "0.00")
    return "n/a" if not np.isfinite(c["value"]) else f"{c['value']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"


def table(results: dict, tasks) -> str:
    """Markdown: one row per variant and task."""
    rows = ["| variant | task | circuit % text / image | nIoU D | nIoU Q | nIoU G | interchange D | interchange Q | "
            "interchange G | back-patching gain (points) |", "|" + "---|" * 10]
    for name, per_task in results.items():
        for t in tasks:
            f = per_task[t]
            rows.append(f"| {name} | {task_name(t)} | {100 * f['fraction']['text']:.1f} / {100 * f['fraction']['image']:.1f} | "
                        + " | ".join(_ci(f["niou"][s]) for s in SPANS) + " | "
                        + " | ".join(_ci(f["interchange"][s]) for s in SPANS) + f" | {_ci(f['gain'])} |")
    return "\n".join(rows) + "\n"


def figure(results: dict, tasks, path: Path) -> Path:
    """Per task, each variant's nIoU of Q and G and its back-patching gain, with 95 % CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("nIoU Q", lambda f: f["niou"]["Q"]), ("nIoU G", lambda f: f["niou"]["G"]),
              ("interchange G", lambda f: f["interchange"]["G"]), ("back-patching gain (points)", lambda f: f["gain"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.45 * len(results) * len(tasks) + 1.5))
    names = list(results)
    for ax, (label, get) in zip(axes, panels):
        for k, t in enumerate(tasks):
            y = np.arange(len(names)) + k * (len(names) + 1)
            cis = [get(results[n][t]) for n in names]
            cis = [c if c.get("interpretable", True) else dict(c, value=np.nan) for c in cis]  # n/a: not drawn
            v = np.array([c["value"] for c in cis])
            err = np.array([[max(c["value"] - c["low"], 0), max(c["high"] - c["value"], 0)] for c in cis]).T
            ax.errorbar(v, y, xerr=err, fmt="o", ms=4, capsize=2, color=f"C{k}", label=task_name(t))
        ax.set_yticks([i + k * (len(names) + 1) for k in range(len(tasks)) for i in range(len(names))],
                      [n for _ in tasks for n in names], fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.invert_yaxis()
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Headline findings under our method, the reference code's, and each reference choice alone (95% CI)")
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per interval")
    p.add_argument("--out", default="results")
    p.add_argument("--all-prompts", action="store_true", help="keep wrongly answered prompts (random test models)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"variants to run and show, in this order (default all: {', '.join(VARIANTS)})")
    args = p.parse_args(argv)
    model = load_model(args.model)
    base = Path(args.out) / model.name.replace("/", "--")
    results, skipped = {}, []
    for name in args.variants:
        method = VARIANTS[name]
        if name == "only positions" and not model.adapter.mm_token_type_ids:  # 1-D positions already: same as ours
            skipped.append(name)
            continue
        print(f"== {name}: {method}")
        study = steps.Study(model, out=str(base / ".cache" / "method_ablation" / name.replace(" ", "_")),
                            tasks=tuple(args.tasks), n=args.n, resamples=args.resamples, method=method,
                            all_prompts=args.all_prompts)
        done = steps.run(study, STEPS)
        results[name] = {t: findings(study.dir, t) for t in done}
    tasks = [t for t in args.tasks if all(t in r for r in results.values())]
    text = (f"# Method ablation on {model.name}\n\n`python experiments/method_ablation.py --model {args.model}` "
            f"({args.resamples} bootstrap resamples; n = {args.n}). Variants: {', '.join(results)} (\"reference\": the "
            "reference code's choices all at once; \"only X\": that single reference choice alone, docs/method.md "
            "section 11). An interchange score reads n/a, with "
            "its margin ΔF = F(original) − F(random) beside it, where ΔF is below "
            f"{MIN_MARGIN} in either direction: its denominator is noise (docs/method.md section 6)."
            + (f" Not run: {', '.join(skipped)} (this family's positions are 1-D already, so it equals ours)."
               if skipped else "") + "\n\n" + table(results, tasks))
    with atomic(base / "method_ablation.md") as tmp, open(tmp, "w") as f:
        f.write(text)
    print(text)
    print(figure(results, tasks, base / "method_ablation.png"))


if __name__ == "__main__":
    main()
