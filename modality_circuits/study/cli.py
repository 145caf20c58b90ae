"""Command line: `modality-circuits <command> --help`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
import time

from ..data import tasks
from ..execution import budget
from . import steps


def cmd_discover(args) -> None:
    """The study's attribution step (IG on the discovery split) -> <out>/<model>/<task>/<modality>/scores.safetensors."""
    s = _study(args)
    for modality in args.modality:
        scores = steps.run_scores(s, args.task, modality)
        print(f"{args.task}/{modality}: IG scores (k={s.steps}) of {scores.n_pairs} discovery pairs -> "
              f"{s.path(args.task, 'scores.safetensors', modality)}")


def cmd_evaluate(args) -> None:
    """The study's curve step: faithfulness curve on the evaluation split, and the discovered circuit."""
    s = _study(args)
    for modality in args.modality:
        curve = steps.run_curve(s, args.task, modality)
        found = f"{curve['minimal_fraction']:.1%}" if curve["minimal_fraction"] is not None else "not reached"
        print(f"{args.task}/{modality}: faithfulness curve on {curve['n_eval_pairs']} pairs; smallest fraction with "
              f"F >= {curve['threshold']}: {found}; circuit at {curve['circuit_fraction']:.1%}; CPR {curve['cpr']:.3f}, "
              f"CMD {curve['cmd']:.3f} -> {s.path(args.task, 'curve.json', modality)}")


def _study_args(p: argparse.ArgumentParser, tasks_arg: bool = True) -> None:
    p.add_argument("--model", default="toy", help="'toy' (embedded default), 'tiny-<family>', a short name, hub id or path")
    if tasks_arg:
        p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS),
                       help="built-in tasks (" + ", ".join(tasks.TASKS) + ") or ones a --task-file registers")
    p.add_argument("--n", type=int, default=48, help="correctly answered pairs per task and modality")
    p.add_argument("--steps", type=int, default=5, help="integrated-gradient steps k")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt generator and the bootstrap")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--out", default="results", help="results folder; files go to <out>/<model>/")
    p.add_argument("--data-dir", default=None, help="folder with <task>.csv and images for factual recall / sentiment")
    p.add_argument("--task-file", action="append", default=[],
                   help="a Python file registering your own task (modality_circuits.tasks.register(Task(...)))")
    p.add_argument("--remote", nargs="?", const=True, default=False, metavar="HOST",
                   help="run traces on NDIF (optionally at HOST; 'local' = nnsight's serialisation dry run)")
    p.add_argument("--all-prompts", action="store_true", help="keep wrongly answered prompts (random test models)")
    p.add_argument("--force", action="store_true", help="recompute finished steps instead of reusing them")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the rendered images in pixels; None: the study's size for the model's family")
    p.add_argument("--memory-budget", default="auto", type=budget.parse,
                   help="memory every forward may use: bytes, e.g. 40GB, or 'auto' (80%% of the free GPU memory, "
                        "50%% of the available RAM on CPU)")
    p.add_argument("--reference", action="store_true",
                   help="reproduce the study's code: its head score, interpolation, 1-D positions, mean of ratios, "
                        "nIoU formula, random draw and back-patching selection (docs/method.md section 11)")
    p.add_argument("--position-probes", type=int, default=64,
                   help="positions the exact position effect probes at most: every Q and G position and evenly spaced "
                        "D positions (0: all)")


def _check_writable(out: Path) -> None:
    """--out must be a folder this process can write (created if missing): checked before any work."""
    folder = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {folder} is not writable")


def _study(args):
    from ..zoo import load_model

    for path in args.task_file:
        tasks.load_task_file(path)
    chosen = tuple(getattr(args, "tasks", None) or [args.task])  # per-step commands name one --task
    steps.check_settings(chosen, n=args.n, steps=args.steps, resamples=args.resamples)  # before loading the model
    _check_writable(Path(args.out))
    model = load_model(args.model, remote=args.remote)
    return steps.Study(model, out=args.out, tasks=chosen, n=args.n, steps=args.steps, seed=args.seed,
                       resamples=args.resamples, all_prompts=args.all_prompts, data_dir=args.data_dir, force=args.force,
                       image_size=args.image_size, memory_budget=args.memory_budget,
                       position_probes=args.position_probes or None, reference=args.reference)


def experiment(doc: str, names: tuple[str, ...], draw, argv=None, *, study: bool = False) -> None:
    """Entry point of an experiments/ script: run `names` of the study's steps (resumable), then draw(folder, tasks)
    (study=True: draw(study, tasks), for figures that need the model)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _study_args(p)
    args = p.parse_args(argv)
    s = _study(args)
    done = steps.run(s, names)
    print(draw(s, done) if study else draw(s.dir, done))


def cmd_reproduce(args) -> None:
    from . import figures
    from .report import write_report

    s = _study(args)
    start = time.perf_counter()
    print(f"reproducing the study on {s.model.name} for {', '.join(s.tasks)} -> {s.dir}")
    done = steps.run(s)
    figures.gallery(s.model, s.dir, s.tasks, seed=s.seed, data_dir=s.data_dir, image_size=s.image_size)
    figures.circuit_maps(s.model, s.dir, done, data_dir=s.data_dir)
    for draw in (figures.position_effect_bars, figures.faithfulness_curves, figures.overlap_heatmap,
                 figures.interchange_bars, figures.alignment_lines, figures.backpatch_bars):
        draw(s.dir, done)
    report = write_report(s.dir, done, s.model.name, s.resamples, skipped=[t for t in s.tasks if t not in done])
    print(f"done in {time.perf_counter() - start:.0f}s: {report}, {s.dir / 'summary.json'} and figures in {s.dir}")


def cmd_analysis(args) -> None:
    """overlap / interchange / alignment / backpatch of one task: run (or reuse) the step and print its JSON."""
    import json

    s = _study(args)
    print(json.dumps(steps.STEPS[args.command](s, args.task), indent=1))


def cmd_validate(args) -> None:
    """The recovery benchmark: the ordinary study on a model organism with planted circuits (docs/validation.md)."""
    from .validate import table, validate

    record = validate(args.seed, args.control, args.out, tasks=args.tasks, n=args.n, resamples=args.resamples)
    print(table(record))
    print(f"{record['time']['wall_s']:.0f} s ({record['time']['cpu_s']:.0f} s CPU) -> {Path(args.out) / 'recovery.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modality-circuits", description="Find and compare the circuits "
                                     "vision-language models use for the same task given as text and as an image.")
    sub = parser.add_subparsers(dest="command", required=True)
    per_step = {
        "discover": ("the study's attribution step: integrated-gradient scores on the discovery split", cmd_discover),
        "evaluate": ("the study's curve step: faithfulness curve on the evaluation split and the discovered circuit",
                     cmd_evaluate),
    }
    for name, (text, func) in per_step.items():
        p = sub.add_parser(name, help=text, description=text + " (the same files and settings as `reproduce`)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _study_args(p, tasks_arg=False)
        p.add_argument("--task", required=True, help="a built-in task or one a --task-file registers")
        p.add_argument("--modality", nargs="+", default=list(tasks.MODALITIES), choices=tasks.MODALITIES)
        p.set_defaults(func=func)
    helps = {
        "overlap": "nIoU of the textual and visual circuits of a task per span (D, Q, G)",
        "interchange": "swap each span's sub-circuit between the textual and visual circuits",
        "alignment": "per layer, how text-like the image-token residuals are",
        "backpatch": "back-patch late image-token residuals into earlier layers; gain on a test split",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _study_args(p, tasks_arg=False)
        p.add_argument("--task", required=True, help="a built-in task or one a --task-file registers")
        p.set_defaults(func=cmd_analysis)
    p = sub.add_parser("reproduce", help="the whole study: circuits, analyses, figures, summary.json and report.md",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _study_args(p)
    p.set_defaults(func=cmd_reproduce)
    text = "recovery benchmark: the ordinary study on a model organism whose circuits are known by construction"
    p = sub.add_parser("validate", help=text, description=text + " (docs/validation.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, required=True, help="the organism's seed (an integer)")
    p.add_argument("--control", action="store_true", help="the control organism: same sizes, no planted finding")
    p.add_argument("--out", required=True, help="folder for recovery.json and the study's files")
    p.add_argument("--tasks", nargs="+", default=None, help="the organism's tasks (default: all of them)")
    p.add_argument("--n", type=int, default=48, help="correctly answered pairs per task and modality")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:  # every result file is written atomically: what finished is kept, nothing is half
        print(f"interrupted: finished steps are kept under {args.out}; the same command resumes", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
