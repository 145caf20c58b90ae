"""Benchmark: modality_circuits.attribute against a plain-PyTorch floor and step-at-a-time IG.

All three compute the same integrated-gradient node scores (k steps, all heads and neurons,
every position) on the same model and pairs:
  library   modality_circuits.attribute (nnsight trace, k+1 rows per pair batched, one backward per chunk)
  floor     plain PyTorch hooks doing the same batched forward+backward (no nnsight)
  stepwise  plain PyTorch hooks, one interpolation step per forward+backward (how the reference code runs)
Each method runs in its own subprocess so peak memory (max RSS, or CUDA peak) is its own.

    python experiments/bench_attribution.py --model toy --task counting --modality image --pairs 16 --steps 5
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import torch

METHODS = ("library", "floor", "stepwise")


def _grads(model, inputs, replace_input, answers=None):
    """One forward (+backward of summed LD if answers given) with torch hooks, layer-0 input replaced.

    Returns [(activation, gradient or None)] per node module (heads, neurons, per layer)."""
    layers = model.layers(model.hf_model)
    mods = [m for layer in layers for m in (model.head_site(layer), model.neuron_site(layer))]
    held = []

    def keep(module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
        held.append(args[0])

    handles = [layers[0].register_forward_pre_hook(lambda m, a: (replace_input(a[0]), *a[1:]))]
    handles += [m.register_forward_pre_hook(keep) for m in mods]
    with torch.set_grad_enabled(answers is not None):
        logits = model.hf_model(**inputs).logits[:, -1]
    if answers is not None:
        ld = logits.gather(-1, answers)
        (ld[:, 0] - ld[:, 1]).sum().backward()
    for h in handles:
        h.remove()
    return [(x.detach(), x.grad) for x in held]


def _score(model, diff, grad, acc_heads, acc_neurons, j):
    """Add Σ_dims (a(p') − a(p)) · grad of node module j (even: heads, odd: neurons) to the accumulators."""
    s = (diff * grad).sum(0)
    if j % 2 == 0:
        acc_heads[j // 2] += s.view(s.shape[0], model.n_heads, -1).sum(-1)
    else:
        acc_neurons[j // 2] += s


def floor_ig(model, pairs, steps, max_rows=48):
    """Batched IG in plain PyTorch: k+1 rows per pair (p' first, then α = 1/k..1), one backward per chunk."""
    from modality_circuits.data.pairs import batch

    T, L = pairs[0].length, model.n_layers
    heads, neurons = torch.zeros(L, T, model.n_heads), torch.zeros(L, T, model.d_mlp)
    per, R = max(1, max_rows // (steps + 1)), steps + 1
    alpha = torch.arange(R) / steps
    for start in range(0, len(pairs), per):
        chunk = pairs[start:start + per]
        P = len(chunk)

        def interpolate(h):
            h = h.view(P, R, *h.shape[1:])
            x = h[:, :1] + alpha.view(1, -1, 1, 1).to(h) * (h[:, -1:] - h[:, :1])
            return x.flatten(0, 1).detach().requires_grad_(True)

        answers = torch.tensor([[p.answer_id, p.cf_answer_id] for p in chunk for _ in range(R)])
        answers = answers.view(P, R, 2)
        rows = batch([x for p in chunk for x in [p.cf_inputs] + [p.inputs] * steps])
        held = _grads(model, rows, interpolate, answers.view(-1, 2))
        for j, (a, g) in enumerate(held):
            a, g = a.view(P, R, *a.shape[1:]), g.view(P, R, *g.shape[1:])
            _score(model, a[:, 0] - a[:, -1], g[:, 1:].sum(1) / steps, heads, neurons, j)
    n = len(pairs)
    return heads.permute(0, 2, 1) / n, neurons.permute(0, 2, 1) / n


def stepwise_ig(model, pairs, steps):
    """IG one interpolation step per forward+backward (one row), as the reference code runs it."""
    from modality_circuits.data.pairs import batch

    T, L = pairs[0].length, model.n_layers
    heads, neurons = torch.zeros(L, T, model.n_heads), torch.zeros(L, T, model.d_mlp)
    for p in pairs:
        answers = torch.tensor([[p.answer_id, p.cf_answer_id]])
        clean = {}

        def grab(h):
            clean["e"] = h.detach()
            return h

        acts = _grads(model, batch([p.cf_inputs, p.inputs]), grab)
        e_cf, e = clean["e"][:1], clean["e"][1:]
        for j in range(1, steps + 1):
            x = e_cf + j / steps * (e - e_cf)
            held = _grads(model, p.inputs, lambda h, x=x: x.clone().requires_grad_(True), answers)
            for m, ((a, _), (_, g)) in enumerate(zip(acts, held)):
                _score(model, a[:1] - a[1:], g / steps, heads, neurons, m)
    n = len(pairs)
    return heads.permute(0, 2, 1) / n, neurons.permute(0, 2, 1) / n


def _setup(args):
    from modality_circuits import load_model
    from modality_circuits.data.pairs import build_pairs
    from modality_circuits.methods.attribution import attribute

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    pairs = build_pairs(args.task, args.modality, model, n=args.pairs, seed=0)
    return {
        "library": lambda: attribute(model, pairs, steps=args.steps, progress=False).heads,
        "floor": lambda: floor_ig(model, pairs, args.steps)[0],
        "stepwise": lambda: stepwise_ig(model, pairs, args.steps)[0],
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(args) -> int:
    """Peak bytes one run of args.method adds: CUDA peak, or on CPU the RSS growth sampled every millisecond."""
    run = _setup(args)[args.method]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated()
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    run()
    done.set()
    thread.join()
    return max(peak[0], _rss() - base)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--task", default="counting")
    p.add_argument("--modality", default="image")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", choices=METHODS, help="(internal) measure one method's peak memory")
    args = p.parse_args()
    if args.method:
        print(peak_memory(args))
        return
    runs = _setup(args)
    checks = {m: float(runs[m]().abs().sum()) for m in METHODS}  # warm-up, and the three must agree
    times = {m: [] for m in METHODS}
    for _ in range(args.repeats):  # round robin, so load on the machine hits every method alike
        for m in METHODS:
            t = time.perf_counter()
            runs[m]()
            times[m].append(time.perf_counter() - t)
    best = {m: min(v) for m, v in times.items()}
    peak = {m: int(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--method", m], check=True,
                                  capture_output=True, text=True).stdout.split()[-1]) for m in METHODS}
    print(f"model {args.model}, {args.task}/{args.modality}, {args.pairs} pairs, k={args.steps}, "
          f"{args.threads} threads, best of {args.repeats}")
    for m in METHODS:
        print(f"  {m:9s} {best[m]:8.3f} s  {best[m] / best['floor']:5.2f}x floor   peak +{peak[m] / 2**20:7.1f} MiB"
              f"   |scores| {checks[m]:.6g}")
    print(f"library / floor = {best['library'] / best['floor']:.2f}x (goal <= 1.25x); "
          f"stepwise / library = {best['stepwise'] / best['library']:.2f}x (goal > 1)")


if __name__ == "__main__":
    main()
