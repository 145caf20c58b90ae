"""The memory model of linear-attention layers (execution/budget.py), against measured peaks.

Two sources, both Qwen/Qwen3.5-27B widths in bfloat16 on the CPU:
  layer   one Gated DeltaNet layer (transformers' `Qwen3_5GatedDeltaNet`, random weights) on R rows of T tokens,
          a forward without gradients or a forward + backward to the input through n stacked calls; each
          measurement in its own process (peak RSS growth, the high-water mark reset after the weights are built),
          per row = the growth difference between R = 9 and R = 1 over 8 rows. The kept (T', W) float32 tensors
          per layer come from n = 3 minus n = 1, the live ones from the forward.
  package the per-row peaks of the package's attribute and ablation steps at four layers (linear, linear, linear,
          full), measured by experiments/bench_scale.py (results/scale/bench_scale_cpu_qwen3_5.json), and their
          projection to 64 layers, against budget.row_bytes without and with the linear-layer terms.

    python experiments/bench_scale.py ... (the committed package measurement)
    python experiments/budget_linear.py --json results/budget/linear_qwen3_5.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Qwen3.5-27B's Gated DeltaNet widths (transformers' defaults; experiments/bench_scale.py REAL).
WIDTHS = dict(hidden_size=5120, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
              linear_value_head_dim=128, linear_conv_kernel_dim=4)
#: (tokens, mode): forward, forward + backward through 1 and 3 calls of the layer.
RUNS = ((77, "fwd", 1), (200, "fwd", 1), (77, "bwd", 1), (77, "bwd", 3), (200, "bwd", 1), (200, "bwd", 3))


def child(rows: int, tokens: int, mode: str, calls: int) -> int:
    """Peak RSS growth (bytes) of one measurement in this process."""
    import transformers as T
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    torch.set_num_threads(1)
    layer = Qwen3_5GatedDeltaNet(T.Qwen3_5TextConfig(**WIDTHS, num_hidden_layers=4), 0)
    layer = layer.to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, tokens, WIDTHS["hidden_size"], dtype=torch.bfloat16, requires_grad=mode == "bwd")
    with open("/proc/self/clear_refs", "w") as f:  # resets the high-water mark (VmHWM) to the current RSS
        f.write("5")
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with torch.set_grad_enabled(mode == "bwd"):
        y = x
        for _ in range(calls):
            y = layer(y)
        if mode == "bwd":
            y.float().sum().backward()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return peak - base


def measure(rows: int, tokens: int, mode: str, calls: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", str(rows), str(tokens), mode, str(calls)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


def unit(tokens: int) -> int:
    """Bytes of one (T', W) float32 tensor: T padded to the chunk, W = value heads x value-head width."""
    from modality_circuits.execution.budget import LINEAR_CHUNK

    padded = -(-tokens // LINEAR_CHUNK) * LINEAR_CHUNK
    return padded * WIDTHS["linear_num_value_heads"] * WIDTHS["linear_value_head_dim"] * 4


def layer_runs() -> list[dict]:
    runs = []
    for tokens, mode, calls in RUNS:
        per_row = (measure(9, tokens, mode, calls) - measure(1, tokens, mode, calls)) / 8
        runs.append(dict(T=tokens, mode=mode, calls=calls, bytes_per_row=per_row, units=per_row / unit(tokens)))
        print(f"layer T={tokens} {mode} x{calls}: {per_row / 1e6:.1f} MB per row = {per_row / unit(tokens):.1f} (T', W)"
              " float32 tensors")
    return runs


def package_ratios() -> list[dict]:
    """Measured (or projected) per-row bytes of the package's steps over budget.row_bytes, old and new model."""
    sys.path.insert(0, HERE)
    import bench_scale

    from modality_circuits.execution import budget

    with open(os.path.join(ROOT, "results/scale/bench_scale_cpu_qwen3_5.json")) as f:
        found = json.load(f)["models"]["qwen3_5"]
    steps, projection = found["steps"], found["projection"]
    T = steps["attribute"]["T"]
    measured = {4: {kind: bench_scale.per_row_bytes(steps[step]) for kind, step in (("ig", "attribute"),
                                                                                    ("forward", "ablation"))},
                64: {"ig": projection["gb_per_ig_row_package"] * 1e9, "forward": projection["gb_per_fwd_row_package"] * 1e9}}
    out, terms = [], (budget.LINEAR_LIVE, budget.LINEAR_KEPT)
    for layers, by_kind in measured.items():
        model = bench_scale.build("qwen3_5", layers=layers, vision_layers=1, quick=False, dtype=torch.bfloat16,
                                  device="meta")
        for kind, value in by_kind.items():
            model_bytes = {}
            for name, (live, kept) in (("without", (0, 0)), ("with", terms)):
                budget.LINEAR_LIVE, budget.LINEAR_KEPT = live, kept
                model_bytes[name] = budget.row_bytes(model, T, backward=kind == "ig")
            budget.LINEAR_LIVE, budget.LINEAR_KEPT = terms
            out.append(dict(layers=layers, kind=kind, T=T, measured_bytes=value, source="measured" if layers == 4 else
                            "projected", model_without=model_bytes["without"], model_with=model_bytes["with"],
                            ratio_without=value / model_bytes["without"], ratio_with=value / model_bytes["with"]))
            print(f"package {layers} layers, {kind} row: {value / 1e6:.1f} MB; measured/model without the linear terms "
                  f"{out[-1]['ratio_without']:.2f}x, with them {out[-1]['ratio_with']:.2f}x")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        rows, tokens, mode, calls = args.child
        print(child(int(rows), int(tokens), mode, int(calls)))
        return 0
    from modality_circuits.execution import budget

    result = dict(widths=WIDTHS, chunk=budget.LINEAR_CHUNK, live=budget.LINEAR_LIVE, kept=budget.LINEAR_KEPT,
                  layer=layer_runs(), package=package_ratios())
    if args.json:
        from modality_circuits.execution.store import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
