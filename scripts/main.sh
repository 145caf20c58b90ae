#!/usr/bin/env bash
# The main job: sets up .venv, then runs the whole study on the embedded default model -> results/toy/.
# Extra arguments go to `modality-circuits reproduce` (e.g. --model tiny-llava --all-prompts).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
modality-circuits reproduce --model toy "$@"
