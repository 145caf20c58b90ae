#!/usr/bin/env bash
# The test suite, as a new user (and CI) runs it: sets up .venv, then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
# the viewer's browser test drives Debian's chromium; without it (no root, no mirror) that test is skipped, saying why
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 ||
    echo "chromium could not be installed: the viewer's browser test will be skipped" >&2
fi
python -m pytest -q "$@"
