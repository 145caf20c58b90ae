"""ruff (pyflakes, pycodestyle errors and warnings, import order; configured in pyproject.toml) finds nothing.

ruff is in the `test` extra, which scripts/setup.sh installs: a missing ruff is a failure, not a skip."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, f"ruff check found problems:\n{run.stdout}\n{run.stderr}"
