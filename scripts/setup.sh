#!/usr/bin/env bash
# Create (or reuse) .venv and install modality_circuits with what it needs. Sourced by the other scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MC_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: a plain dependency resolution would pull a multi-GB CUDA build where none is installed
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
stamp="$venv/.mc-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$py" -m pip install -q -e "$root[test,docs]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
