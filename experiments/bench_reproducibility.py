"""Do numbers move with the thread count or the chunking? Each run in a fresh process, with MKL's strict
reproducibility mode on (the package's default, `MKL_CBWR=AVX2,STRICT`) and off (`MKL_CBWR=` empty).

For tiny Qwen2-VL (counting, text) and tiny LLaVA (counting, image), 16 pairs, k = 3: attribution sums and the
ablation LDs of the top-20 % circuit, with 1 thread and canonical chunks (the reference), 2 threads and canonical
chunks, 2 threads and one row a chunk (`max_rows=1`); prints the largest difference relative to the largest value.
Then the cost of the mode: CPU seconds of `attribute` (36 toy image pairs, k = 5) and of 24 ablated circuits on 36
pairs, one thread, repeated.

    OMP_NUM_THREADS=1 python experiments/bench_reproducibility.py [--repeats 3] [--json results/reproducibility.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"strict": "AVX2,STRICT", "off": ""}
CASES = (("qwen2_vl", "text"), ("llava", "image"))
RUNS = {"1 thread": (1, None), "2 threads": (2, None), "2 threads, max_rows=1": (2, 1)}


def child_values(family: str, modality: str, threads: int, max_rows, out: str) -> None:
    """Attribution sums and ablation LDs of one setting, saved to `out`."""
    import torch
    from safetensors.torch import save_file

    from modality_circuits.circuits.circuit import Circuit
    from modality_circuits.data.pairs import build_pairs
    from modality_circuits.methods.ablation import ablation_lds
    from modality_circuits.methods.attribution import attribute
    from modality_circuits.testing import tiny_model

    torch.set_num_threads(threads)
    model = tiny_model(family)
    pairs = build_pairs("counting", modality, model, n=16, seed=1)
    s = attribute(model, pairs, steps=3, max_rows=max_rows, progress=False)
    lds = ablation_lds(model, [Circuit.from_scores(s, fraction=0.2)], pairs, max_rows=max_rows)
    save_file({"heads": s.heads.contiguous(), "neurons": s.neurons.contiguous(), "LDs": lds.contiguous()}, out)


def child_time(repeats: int, out: str) -> None:
    """CPU seconds of attribution and of ablating 24 circuits on the toy, `repeats` times, saved to `out` as JSON."""
    import torch

    from modality_circuits.circuits.circuit import Circuit
    from modality_circuits.data.pairs import build_pairs
    from modality_circuits.methods.ablation import ablation_lds
    from modality_circuits.methods.attribution import attribute
    from modality_circuits.zoo import load_model

    torch.set_num_threads(1)
    model = load_model("toy")
    pairs = build_pairs("counting", "image", model, n=72, seed=1)
    times = {"attribute": [], "ablate": []}
    for _ in range(repeats):
        t = time.process_time()
        s = attribute(model, pairs[:36], steps=5, progress=False)
        times["attribute"].append(time.process_time() - t)
        circuits = [Circuit.from_scores(s, fraction=0.01 * i) for i in range(1, 25)]
        t = time.process_time()
        ablation_lds(model, circuits, pairs[36:])
        times["ablate"].append(time.process_time() - t)
    Path(out).write_text(json.dumps(times))


def run_child(mode: str, args: list[str]) -> None:
    env = {**os.environ, "MKL_CBWR": MODES[mode], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, __file__, "--child", *args], check=True, env=env, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "values":
            family, modality, threads, max_rows, out = rest
            child_values(family, modality, int(threads), None if max_rows == "-" else int(max_rows), out)
        else:
            child_time(int(rest[0]), rest[1])
        return
    from safetensors.torch import load_file

    result = {"differences": [], "cpu_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            for family, modality in CASES:
                got = {}
                for name, (threads, max_rows) in RUNS.items():
                    out = f"{tmp}/{mode}-{family}-{threads}-{max_rows}.safetensors"
                    run_child(mode, ["values", family, modality, str(threads), str(max_rows or "-"), out])
                    got[name] = load_file(out)
                reference = got["1 thread"]
                for name in list(RUNS)[1:]:
                    diff = {k: float((got[name][k] - v).abs().max() / v.abs().max()) for k, v in reference.items()}
                    result["differences"].append({"mode": mode, "model": f"tiny {family}", "modality": modality,
                                                  "against 1 thread": name, **diff})
                    print(f"{mode:6s} {family:8s} {modality:5s} {name:22s} " +
                          "  ".join(f"{k} {v:.1e}" for k, v in diff.items()))
            out = f"{tmp}/time-{mode}.json"
            run_child(mode, ["time", str(args.repeats), out])
            result["cpu_s"][mode] = json.loads(Path(out).read_text())
            print(mode, "CPU s:", {k: [round(x, 2) for x in v] for k, v in result["cpu_s"][mode].items()})
    if args.json:
        from modality_circuits.execution.store import write_json

        write_json(args.json, {"args": {"repeats": args.repeats}, **result})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
