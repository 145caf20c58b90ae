"""Command line: `modality-circuits <command> --help`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import tasks


def _common(p: argparse.ArgumentParser, task=True) -> None:
    p.add_argument("--model", default="toy", help="'toy' (embedded default), 'tiny-<family>', a short name, hub id or path")
    if task:
        p.add_argument("--task", required=True, choices=tasks.TASKS)
        p.add_argument("--modality", required=True, choices=tasks.MODALITIES)
    p.add_argument("--n", type=int, default=64, help="number of prompt pairs (75%% discovery, 25%% evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="results folder; files go to <out>/<model>/")
    p.add_argument("--data-dir", default=None, help="folder with <task>.csv and images for factual recall / sentiment")
    p.add_argument("--remote", nargs="?", const=True, default=False, metavar="HOST",
                   help="run traces on NDIF (optionally at HOST; 'local' = nnsight's serialisation dry run)")
    p.add_argument("--all-prompts", action="store_true",
                   help="keep prompts the model answers wrongly (default: only correctly answered ones)")


def _pairs(model, args, task=None, modality=None):
    """Pairs for the run: build, keep correctly answered ones unless --all-prompts, cut to --n."""
    from .pairs import build_pairs, keep_correct

    task, modality = task or args.task, modality or args.modality
    if args.all_prompts:
        return build_pairs(task, modality, model, n=args.n, seed=args.seed, data_dir=args.data_dir)
    pairs = keep_correct(model, build_pairs(task, modality, model, n=3 * args.n, seed=args.seed, data_dir=args.data_dir))
    if len(pairs) < 4:
        sys.exit(f"{model.name} answers only {len(pairs)} of {3 * args.n} {task}/{modality} pairs correctly; "
                 "use --all-prompts to keep wrongly answered ones")
    return pairs[: args.n]


def _run_dir(args, model) -> Path:
    from .store import model_dir

    return model_dir(args.out, model.name) / args.task / args.modality


def cmd_discover(args) -> None:
    from .attribution import attribute
    from .circuit import Circuit
    from .models import load_model
    from .pairs import split

    model = load_model(args.model, remote=args.remote)
    discovery, _ = split(_pairs(model, args))
    start = time.perf_counter()
    scores = attribute(model, discovery, steps=args.steps)
    out = _run_dir(args, model)
    out.mkdir(parents=True, exist_ok=True)
    scores.save(out / "scores.safetensors")
    circuit = Circuit.from_scores(scores, fraction=args.fraction)
    circuit.save(out / "circuit.safetensors")
    print(f"attributed {len(discovery)} pairs (k={args.steps}) in {time.perf_counter() - start:.1f}s; "
          f"circuit at {args.fraction:.1%}: {circuit.n_heads} head and {circuit.n_neurons} neuron nodes -> {out}")


def cmd_evaluate(args) -> None:
    from .circuit import Circuit, Scores
    from .models import load_model
    from .pairs import split
    from .patching import faithfulness_curve
    from .store import write_json

    model = load_model(args.model, remote=args.remote)
    out = _run_dir(args, model)
    if not (out / "scores.safetensors").exists():
        sys.exit(f"no scores in {out}: run `modality-circuits discover` with the same --model/--task/--modality first")
    scores = Scores.load(out / "scores.safetensors")
    _, evaluation = split(_pairs(model, args))
    curve = faithfulness_curve(model, scores, evaluation, threshold=args.threshold, aggregation=args.aggregation,
                               progress=True)
    write_json(out / "curve.json", {
        "fractions": curve.fractions, "faithfulness": curve.values, "minimal_fraction": curve.minimal_fraction,
        "threshold": curve.threshold, "cpr": curve.cpr, "cmd": curve.cmd, "aggregation": args.aggregation,
        "n_eval_pairs": len(evaluation),
    })
    if curve.minimal_fraction is not None:
        Circuit.from_scores(scores, fraction=curve.minimal_fraction).save(out / "circuit_faithful.safetensors")
    found = f"{curve.minimal_fraction:.1%}" if curve.minimal_fraction is not None else "not reached"
    print(f"faithfulness curve on {len(evaluation)} pairs: smallest fraction with F >= {args.threshold}: {found}; "
          f"CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f} -> {out / 'curve.json'}")


def _study_args(p: argparse.ArgumentParser, tasks_arg: bool = True) -> None:
    p.add_argument("--model", default="toy", help="'toy' (embedded default), 'tiny-<family>', a short name, hub id or path")
    if tasks_arg:
        p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS), choices=tasks.TASKS)
    p.add_argument("--n", type=int, default=48, help="correctly answered pairs per task and modality")
    p.add_argument("--steps", type=int, default=5, help="integrated-gradient steps k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--out", default="results", help="results folder; files go to <out>/<model>/")
    p.add_argument("--data-dir", default=None, help="folder with <task>.csv and images for factual recall / sentiment")
    p.add_argument("--remote", nargs="?", const=True, default=False, metavar="HOST",
                   help="run traces on NDIF (optionally at HOST; 'local' = nnsight's serialisation dry run)")
    p.add_argument("--all-prompts", action="store_true", help="keep wrongly answered prompts (random test models)")
    p.add_argument("--force", action="store_true", help="recompute finished steps instead of reusing them")


def _study(args):
    from .models import load_model
    from .study import Study

    model = load_model(args.model, remote=args.remote)
    return Study(model, out=args.out, tasks=tuple(args.tasks), n=args.n, steps=args.steps, seed=args.seed,
                 resamples=args.resamples, all_prompts=args.all_prompts, data_dir=args.data_dir, force=args.force)


def experiment(doc: str, steps: tuple[str, ...], draw, argv=None) -> None:
    """Entry point of an experiments/ script: run `steps` of the study (resumable), then draw(folder, tasks)."""
    from . import study as st

    p = argparse.ArgumentParser(description=doc)
    _study_args(p)
    args = p.parse_args(argv)
    s = _study(args)
    done = st.run(s, steps)
    print(draw(s.dir, done))


def cmd_reproduce(args) -> None:
    from . import figures
    from . import study as st
    from .report import write_report

    s = _study(args)
    start = time.perf_counter()
    print(f"reproducing the study on {s.model.name} for {', '.join(s.tasks)} -> {s.dir}")
    done = st.run(s)
    figures.gallery(s.model, s.dir, s.tasks, seed=s.seed)
    for draw in (figures.position_effect, figures.faithfulness_curves, figures.overlap_heatmap,
                 figures.interchange_bars, figures.alignment_lines, figures.backpatch_bars):
        draw(s.dir, done)
    report = write_report(s.dir, done, s.model.name, s.resamples, skipped=[t for t in s.tasks if t not in done])
    print(f"done in {time.perf_counter() - start:.0f}s: {report}, {s.dir / 'summary.json'} and figures in {s.dir}")


def cmd_analysis(args) -> None:
    """overlap / interchange / alignment / backpatch of one task: run (or reuse) the step and print its JSON."""
    import json

    from . import study as st

    args.tasks = [args.task]
    s = _study(args)
    print(json.dumps(st.STEPS[args.command](s, args.task), indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modality-circuits", description="Find and compare the circuits "
                                     "vision-language models use for the same task given as text and as an image.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("discover", help="attribute nodes with integrated gradients; write scores and a circuit")
    _common(p)
    p.add_argument("--steps", type=int, default=5, help="integrated-gradient steps k (1 = attribution patching)")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of heads/neurons kept in the written circuit")
    p.set_defaults(func=cmd_discover)
    p = sub.add_parser("evaluate", help="faithfulness curve of the discovered scores on the evaluation pairs")
    _common(p)
    p.add_argument("--threshold", type=float, default=0.8, help="faithfulness that counts as a faithful circuit")
    p.add_argument("--aggregation", default="ratio_of_means", choices=["ratio_of_means", "mean_of_ratios"])
    p.set_defaults(func=cmd_evaluate)
    helps = {
        "overlap": "nIoU of the textual and visual circuits of a task per span (D, Q, G)",
        "interchange": "swap each span's sub-circuit between the textual and visual circuits",
        "alignment": "per layer, how text-like the image-token residuals are",
        "backpatch": "back-patch late image-token residuals into earlier layers; gain on a test split",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        _study_args(p, tasks_arg=False)
        p.add_argument("--task", required=True, choices=tasks.TASKS)
        p.set_defaults(func=cmd_analysis)
    p = sub.add_parser("reproduce", help="the whole study: circuits, analyses, figures, summary.json and report.md")
    _study_args(p)
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
