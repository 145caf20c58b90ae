"""Start-up cost of the package: `import modality_circuits` and `modality-circuits --help`, each in a fresh
interpreter, repeated; prints wall and CPU seconds (median, min-max) and which heavy libraries the import loaded.

    OMP_NUM_THREADS=1 python experiments/bench_import.py [--repeats 7]

Goal (issue 27): both <= 2 s on the 2-core machine. CPU time (user + sys of the child) is the stable figure on a
shared machine; wall time is printed beside it.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import modality_circuits": [sys.executable, "-c", "import modality_circuits"],
    "modality-circuits --help": [sys.executable, "-m", "modality_circuits", "--help"],
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
}
HEAVY = ("torch", "transformers", "nnsight", "matplotlib")


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one run of `cmd` in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    for name, cmd in COMMANDS.items():
        runs = [measure(cmd) for _ in range(args.repeats)]
        print(f"{name:36s} wall {spread([w for w, _ in runs])}; cpu {spread([c for _, c in runs])}")
    probe = f"import sys, modality_circuits; print([m for m in {HEAVY!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.strip()
    print(f"heavy libraries loaded by the import: {loaded}")


if __name__ == "__main__":
    main()
