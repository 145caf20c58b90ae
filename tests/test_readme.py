"""The README's Python walk-through runs as written on the embedded toy."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_walk_through_runs_on_the_toy(capsys):
    section = README.read_text().split("## Walk-through")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README walk-through", "exec"), {})
    printed = capsys.readouterr().out
    assert "CrossInterchange(G:" in printed and "Circuit(" in printed
