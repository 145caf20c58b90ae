#!/usr/bin/env bash
# The test suite, as a new user (and CI) runs it: sets up .venv, then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
python -m pytest -q "$@"
