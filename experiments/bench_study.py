"""Benchmark: the share of the study's time spent outside the model's forward and backward passes, for one task.

Runs every step of the study for one task from scratch (a fresh output folder, --repeats times, one loaded
model) and, in the same run, times every request to the model (`VLM.call`: the nnsight sessions that run its
forward and backward passes, attribution, ablations, back-patching, alignment and the accuracy forwards).
Outside = the steps' time minus that. CPU time (time.process_time, this process) is the measure to trust on
a shared machine; wall clock is printed beside it. docs/performance.md quotes the numbers.

    OMP_NUM_THREADS=1 python experiments/bench_study.py --model toy --task counting --repeats 3 \
        [--json results/toy/bench_study.json]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from modality_circuits.study import steps
from modality_circuits.zoo import load_model


class Clock:
    """Wall and CPU seconds accumulated over the timed calls."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
        return timed


def once(model, task: str, n: int, resamples: int) -> dict:
    """One study of `task` from scratch: {"wall", "cpu"} of the steps and {"model_wall", "model_cpu"} inside VLM.call."""
    clock = Clock()
    model.call = clock.wrap(type(model).call.__get__(model))  # this instance only
    try:
        with tempfile.TemporaryDirectory() as out:
            study = steps.Study(model, out=out, tasks=(task,), n=n, resamples=resamples, force=True)
            wall, cpu = time.perf_counter(), time.process_time()
            steps.run(study)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        del model.call
    return {"wall": wall, "cpu": cpu, "model_wall": clock.wall, "model_cpu": clock.cpu}


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3g}, min {min(values):.3g}, max {max(values):.3g}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--task", default="counting")
    p.add_argument("--n", type=int, default=48, help="correctly answered pairs per modality, as the study")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples, as the study")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the runs here (docs/performance.md is generated from it)")
    args = p.parse_args(argv)
    steps.check_settings((args.task,), n=args.n, steps=5, resamples=args.resamples)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    model = load_model(args.model)
    runs = []
    for r in range(args.repeats):
        runs.append(once(model, args.task, args.n, args.resamples))
        x = runs[-1]
        print(f"repeat {r + 1}: steps {x['cpu']:.1f} s CPU ({x['wall']:.1f} s wall); inside the model "
              f"{x['model_cpu']:.1f} s CPU ({x['model_wall']:.1f} s wall); outside "
              f"{100 * (1 - x['model_cpu'] / x['cpu']):.1f} % of CPU, {100 * (1 - x['model_wall'] / x['wall']):.1f} % "
              "of wall", flush=True)
    for kind in ("cpu", "wall"):
        share = [100 * (1 - x[f"model_{kind}"] / x[kind]) for x in runs]
        total = [x[kind] for x in runs]
        print(f"{kind}: study steps {_spread(total)} s; outside the model's forward and backward passes "
              f"{_spread(share)} %")
    if args.json:
        import os

        from modality_circuits.execution.store import write_json

        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        write_json(args.json, {"args": vars(args), "threads": torch.get_num_threads(), "load_average": load,
                               "runs": runs})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
