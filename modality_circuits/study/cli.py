"""Command line: `modality-circuits <command> --help`."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..data import tasks

# torch, transformers and nnsight load inside the commands (`steps`, `budget`), so `--help` answers at once.


def cmd_discover(args) -> None:
    """The study's attribution step (IG on the discovery split) -> <out>/<model>/<task>/<modality>/scores.safetensors."""
    from . import steps

    s = _study(args)
    for modality in args.modality:
        scores = steps.run_scores(s, args.task, modality)
        path = s.path(args.task, "scores.safetensors", modality)
        _show(args, {"task": args.task, "modality": modality, "steps": s.steps, "n_pairs": scores.n_pairs,
                     "path": str(path)},
              f"{args.task}/{modality}: IG scores (k={s.steps}) of {scores.n_pairs} discovery pairs -> {path}")


def cmd_evaluate(args) -> None:
    """The study's curve step: faithfulness curve on the evaluation split, and the discovered circuit."""
    from . import steps, tables

    s = _study(args)
    for modality in args.modality:
        curve = steps.run_curve(s, args.task, modality)
        if curve.get("undefined"):
            _show(args, curve, f"{args.task}/{modality}: n/a: {curve['undefined']} -> "
                  f"{s.path(args.task, 'curve.json', modality)}")
            continue
        _show(args, curve, tables.curve(curve, args.task, modality) + f"\n-> {s.path(args.task, 'curve.json', modality)}")


def _show(args, record, text: str) -> None:
    """Print the human-readable `text`, or with --json the record as strict JSON."""
    if getattr(args, "json", False):
        import json

        from ..execution.store import _strict

        print(json.dumps(_strict(record), indent=1, allow_nan=False))
    else:
        print(text)


def _study_args(p: argparse.ArgumentParser, tasks_arg: bool = True, *, threshold: bool = True, json: bool = False) -> None:
    p.add_argument("--model", default="toy", help="'toy' (embedded default), 'tiny-<family>', a short name, hub id or path")
    p.add_argument("--wording", choices=("study", "toy"), default=None,
                   help="prompt wording: the study's or the toy's short one (default: the model's own)")
    if threshold:
        p.add_argument("--threshold", type=float, default=0.8,
                       help="faithfulness the discovered circuit must reach (its smallest fraction with F >= this)")
    if json:
        p.add_argument("--json", action="store_true", help="print the result as JSON (for machines) instead of a table")
    if tasks_arg:
        p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS),
                       help="built-in tasks (" + ", ".join(tasks.TASKS) + ") or ones a --task-file registers")
    p.add_argument("--n", "--pairs", dest="n", type=int, default=48,
                   help="correctly answered pairs per task and modality (the study used about 250)")
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
    p.add_argument("--memory-budget", default="auto", type=_budget,
                   help="memory every forward may use: bytes, e.g. 40GB, or 'auto' (80%% of the free GPU memory, "
                        "50%% of the available RAM on CPU)")
    p.add_argument("--reference", action="store_true",
                   help="reproduce the study's code: its head score, interpolation, 1-D positions, mean of ratios, "
                        "nIoU formula, random draw and back-patching selection (docs/method.md section 11)")
    p.add_argument("--counterfactuals", choices=tasks.COUNTERFACTUALS, default="random",
                   help="how p' is drawn: 'random' (the task's own draw, as the study: for counting an independent "
                        "sequence) or 'minimal' (counting: p' changes only the words the new count needs)")
    p.add_argument("--position-probes", type=int, default=64,
                   help="positions the exact position effect probes at most: every Q and G position and evenly spaced "
                        "D positions (0: all)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error, not one line")


def _budget(text: str):
    """--memory-budget parsed by execution.budget (imported here: it needs torch)."""
    from ..execution import budget

    return budget.parse(text)


def _study(args):
    from ..zoo import load_model
    from . import steps

    for path in args.task_file:
        tasks.load_task_file(path)
    chosen = tuple(getattr(args, "tasks", None) or [args.task])  # per-step commands name one --task
    threshold = getattr(args, "threshold", 0.8)
    steps.check_settings(chosen, n=args.n, steps=args.steps, resamples=args.resamples, threshold=threshold,
                         image_size=args.image_size, data_dir=args.data_dir,
                         counterfactuals=args.counterfactuals)  # before loading the model
    from ..execution.store import check_writable

    check_writable(Path(args.out))
    if getattr(args, "held", None) is not None:  # one run at a time writes --out (released when the command ends)
        from ..execution import store

        args.held.enter_context(store.lock(args.out))
    model = load_model(args.model, remote=args.remote)
    if args.wording:
        model.wording = args.wording
    study = steps.Study(model, out=args.out, tasks=chosen, n=args.n, steps=args.steps, seed=args.seed,
                        threshold=threshold, resamples=args.resamples, all_prompts=args.all_prompts,
                        data_dir=args.data_dir, force=args.force, image_size=args.image_size,
                        memory_budget=args.memory_budget, position_probes=args.position_probes or None,
                        reference=args.reference, counterfactuals=args.counterfactuals)
    for folder, _, _ in os.walk(study.dir):  # a read-only record folder fails here, not after the work
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {args.out}: {folder} is not writable (make it writable or give another --out)")
    return study


def experiment(doc: str, names: tuple[str, ...], draw, argv=None, *, study: bool = False) -> None:
    """Entry point of an experiments/ script: run `names` of the study's steps (resumable), then draw(folder, tasks)
    (study=True: draw(study, tasks), for figures that need the model)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _study_args(p)
    args = p.parse_args(argv)

    def body(args):
        from . import steps

        s = _study(args)
        done = steps.run(s, names)
        print(draw(s, done) if study else draw(s.dir, done))

    _guarded(args, body)


def cmd_reproduce(args) -> None:
    from . import figures, steps
    from .report import write_report

    s = _study(args)
    start = time.perf_counter()
    print(f"reproducing the study on {s.model.name} for {', '.join(s.tasks)} -> {s.dir}")
    steps.run(s)
    # the report and figures show every task recorded in the folder, not only this run's: a run of one task (or a
    # task file) adds or updates its records and never drops the others' from the report
    shown, skipped = steps.recorded_tasks(s.dir)
    if not shown:
        raise steps.TooFewPairs(f"no task of {', '.join(s.tasks)} could be run on {s.model.name}: see "
                                f"{s.dir}/<task>/skipped.json")
    earlier = [t for t in shown if t not in s.tasks]
    if earlier:
        print(f"the report and figures also show {', '.join(earlier)}: recorded in {s.dir} by earlier runs")
    # the gallery and circuit maps build prompts: only tasks defined now, with records of this run's settings
    same = [t for t in shown if t in tasks.REGISTRY and steps.read_json(s.path(t, "curve.json", "text")).get(
        "settings") == s.settings_of(t)]
    figures.draw_all(s, shown, prompted=same)
    report = write_report(s.dir, shown, s.model.name, s.resamples, skipped=skipped)
    print(f"done in {time.perf_counter() - start:.0f}s: {report}, {s.dir / 'summary.json'} and figures in {s.dir}")


def cmd_analysis(args) -> None:
    """overlap / interchange / alignment / backpatch of one task: run (or reuse) the step; print a table (or JSON)."""
    from . import steps, tables

    s = _study(args)
    record = steps.STEPS[args.command](s, args.task)
    _show(args, record, f"{args.task}: {args.command} ({s.dir / args.task / (args.command + '.json')})\n"
          + tables.ANALYSES[args.command](record))


def cmd_nodes(args) -> None:
    """A circuit's nodes with their layer, unit, position, span, token (or image patch) and score."""
    from ..circuits.circuit import Circuit
    from . import figures, steps, tables

    s = _study(args)
    scores = steps.run_scores(s, args.task, args.modality)
    circuit = (steps.load_circuit(s, args.task, args.modality) if args.fraction is None else
               Circuit.from_scores(scores, fraction=args.fraction))
    if args.span:
        circuit = circuit.restrict(args.span)
    pair = figures.example_pair(s.model, circuit, args.task, args.modality, s.settings, s.data_dir)
    records = circuit.nodes(pair, scores)
    shown = records if args.top == 0 else records[:args.top]
    more = f"\n... {len(records) - len(shown)} more (--top 0: all)" if len(shown) < len(records) else ""
    _show(args, shown, f"{circuit!r}\nlabelled with the prompt {pair!r}; largest |score| first\n"
          + tables.nodes(shown) + more)


def cmd_draw(args) -> None:
    """One task's figures (running the steps they need) into <out>/<model>/<task>/."""
    from . import figures, steps

    s = _study(args)
    if not steps.run(s):
        raise SystemExit(f"{args.task}: the model answers too few pairs correctly to draw its figures "
                         f"({s.path(args.task, 'skipped.json')})")
    for path in figures.draw_all(s, [args.task], to=s.dir / args.task):
        print(path)


def cmd_view(args) -> None:
    """The interactive viewer of every task of a results folder: one self-contained HTML file per task."""
    folder = Path(args.results_dir)
    found = sorted(p.parent.parent.name for p in folder.glob("*/text/circuit.safetensors")
                   if (p.parent.parent / "image" / "circuit.safetensors").exists())
    chosen = args.tasks or found
    if not found or set(chosen) - set(found):
        raise SystemExit(f"{folder}: no textual and visual circuits of {', '.join(sorted(set(chosen) - set(found))) or 'any task'}"
                         f" (a results folder <out>/<model>/ written by `reproduce` or `evaluate`; found: {found or 'none'})")
    for path in args.task_file:
        tasks.load_task_file(path)
    from ..circuits.circuit import Circuit
    from ..zoo import load_model
    from . import figures

    model = load_model(args.model or Circuit.load(folder / chosen[0] / "text" / "circuit.safetensors").model)
    for path in figures.view_folder(model, folder, chosen, to=Path(args.out) if args.out else None,
                                    data_dir=args.data_dir):
        print(path)


def cmd_teach(args) -> None:
    """Extend the toy's vocabulary with a task file's words and fine-tune it on the task (study/teach.py)."""
    added = []
    for path in args.task_file:
        added += tasks.load_task_file(path)
    task = args.task or (added[0] if len(added) == 1 else None)
    if task is None:
        raise SystemExit(f"--task: the task files register {', '.join(added)}; name the one to teach")
    from .teach import teach

    r = teach(task, args.out or f"models/toy-{task}", base=args.base, minutes=args.minutes, seed=args.seed)
    if args.json:
        _show(args, r, "")
        return
    from .tables import table

    print(f"taught {task} to {r['base']} in {r['steps']} steps: {r['train_wall_s']:.0f} s wall, "
          f"{r['train_cpu_s']:.0f} s CPU ({r['threads']} threads); words added: {', '.join(r['words_added']) or 'none'}")
    print(table(["prompts", "accuracy before", f"after ({r['n_test']} held-out prompts)"],
                [[m, r["accuracy_before"][m], r["test_accuracy"][m]] for m in ("text", "image")]
                + [["built-in tasks", r["builtin_accuracy_before"], r["builtin_accuracy_after"]]]))
    print(f"model folder: {r['out']} (load_model({r['out']!r}); --model {r['out']} on the command line)")


def cmd_validate(args) -> None:
    """The recovery benchmark: the ordinary study on a model organism with planted circuits (docs/validation.md)."""
    from .validate import table, validate

    record = validate(args.seed, args.control, args.out, tasks=args.tasks, n=args.n, resamples=args.resamples,
                      counterfactuals=args.counterfactuals)
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
        _study_args(p, tasks_arg=False, threshold=name == "evaluate", json=True)
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
        _study_args(p, tasks_arg=False, threshold=name in ("overlap", "interchange"), json=True)
        p.add_argument("--task", required=True, help="a built-in task or one a --task-file registers")
        p.set_defaults(func=cmd_analysis)
    text = "list a circuit's nodes: kind, layer, unit, position, span, token or image patch, score"
    p = sub.add_parser("nodes", help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _study_args(p, tasks_arg=False, json=True)
    p.add_argument("--task", required=True, help="a built-in task or one a --task-file registers")
    p.add_argument("--modality", required=True, choices=tasks.MODALITIES)
    p.add_argument("--fraction", type=float, default=None,
                   help="the top fraction of heads and of neurons (default: the discovered circuit)")
    p.add_argument("--span", choices=("D", "Q", "G"), default=None, help="only the nodes at this span's positions")
    p.add_argument("--top", type=int, default=40, help="rows to print, largest |score| first (0: all)")
    p.set_defaults(func=cmd_nodes)
    text = "draw one task's figures (running the steps they need) into <out>/<model>/<task>/"
    p = sub.add_parser("draw", help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _study_args(p, tasks_arg=False)
    p.add_argument("--task", required=True, help="a built-in task or one a --task-file registers")
    p.set_defaults(func=cmd_draw)
    text = "write an interactive circuit viewer per task: one self-contained HTML file (no server, no network)"
    p = sub.add_parser("view", help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="a study's model folder, e.g. results/toy")
    p.add_argument("--out", default=None, help="folder for the <task>.html files (default: RESULTS_DIR)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to show (default: every task with both circuits)")
    p.add_argument("--model", default=None, help="the model to label prompts with (default: the one the circuits name)")
    p.add_argument("--data-dir", default=None, help="the study's data folder, for tasks read from user files")
    p.add_argument("--task-file", action="append", default=[], help="a Python file registering your own task")
    p.set_defaults(func=cmd_view)
    text = "teach the toy a task of your own: extend its vocabulary and fine-tune it (minutes on a CPU)"
    p = sub.add_parser("teach", help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task-file", action="append", required=True, help="a Python file registering your task")
    p.add_argument("--task", default=None, help="the task to teach (default: the one the file registers)")
    p.add_argument("--base", default="toy", help="the model to start from: 'toy' or a folder teach wrote")
    p.add_argument("--out", default=None, help="folder of the new model (default: models/toy-<task>)")
    p.add_argument("--minutes", type=float, default=10.0, help="stop after this much wall-clock time at the latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_teach)
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
    p.add_argument("--n", type=int, default=96, help="correctly answered pairs per task and modality (24 of them "
                   "evaluate: fewer can leave a rarely needed planted position out at F >= 0.8)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--counterfactuals", choices=tasks.COUNTERFACTUALS, default="minimal",
                   help="how p' is drawn ('random': counting's independent sequences leave a word's net effect near "
                        "zero on some evaluation splits; docs/validation.md)")
    p.set_defaults(func=cmd_validate)
    return parser


def _user_errors() -> tuple:
    """Errors that say what is wrong with an input in their message: shown as one line (others also name their type)."""
    from ..execution import store
    from ..execution.remote import RemoteUnavailable
    from . import steps

    return ValueError, OSError, steps.TooFewPairs, store.FolderInUse, RemoteUnavailable


def _interrupt(signum, frame) -> None:
    """Ctrl-C: raise KeyboardInterrupt now and again every 0.2 s until the command ends. nnsight (0.8.1,
    intervention/interleaver.py `cancel`) turns an exception raised while it unwinds an intervention into a
    warning, so one KeyboardInterrupt can be swallowed and the run go on."""
    signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    raise KeyboardInterrupt


def _guarded(args, func) -> None:
    """Run func(args) holding --out's lock; an error is one line on stderr (exit 1) unless --debug."""
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    before = signal.signal(signal.SIGINT, _interrupt) if main_thread else None
    try:
        with contextlib.ExitStack() as held:
            args.held = held
            func(args)
    except KeyboardInterrupt:  # every result file is written atomically: what finished is kept, nothing is half
        signal.setitimer(signal.ITIMER_REAL, 0)
        from tqdm.auto import tqdm

        bars = list(tqdm._instances)  # tqdm 4.70's open bars: closed now, so the message below is the last line
        for bar in bars:
            bar.close()
        print(("\n" if bars else "") + f"interrupted: finished steps are kept under {getattr(args, 'out', '.')}; the "
              "same command resumes", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # every error ends the command the same way
        if getattr(args, "debug", False):
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, _user_errors()):
            text = f"{type(err).__name__}: {text} (an unexpected error: --debug shows where)"
        raise SystemExit(f"modality-circuits: error: {text}") from None
    finally:
        if main_thread:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGINT, before)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    _guarded(args, args.func)


if __name__ == "__main__":
    main()
