"""The README's two commands name scripts that exist; its walk-through runs as written on the embedded toy and
finds circuits that are neither empty nor the whole model."""
import math
import re
from pathlib import Path

from modality_circuits.circuits.circuit import Circuit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_commands_name_scripts_that_exist():
    named = {line.split()[1] for block in _blocks("bash") for line in block.splitlines() if line.startswith("bash ")}
    assert {"scripts/main.sh", "scripts/test.sh"} <= named
    assert all((ROOT / script).is_file() for script in named), named


def test_readme_walk_through_runs_on_the_toy(capsys):
    code = next(b for b in _blocks("python") if 'load_model("toy")' in b)
    space = {}
    exec(compile(code, "README walk-through", "exec"), space)
    printed = capsys.readouterr().out
    assert printed.strip() and "nan" not in printed.lower()
    found = [c for v in space.values() for c in (v.values() if isinstance(v, dict) else [v]) if isinstance(c, Circuit)]
    assert found, "the walk-through builds no circuit"
    for c in found:  # a real circuit: some heads and neurons kept, not all of them
        for mask in (c.heads, c.neurons):
            assert 0 < int(mask.sum()) < mask.numel()
    numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", printed)]
    assert numbers and all(math.isfinite(x) for x in numbers)
