#!/usr/bin/env bash
# The main job on the embedded default model: sets up .venv, then runs the study.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
echo "The embedded model is not shipped yet: running discovery and evaluation on a tiny random LLaVA instead."
for modality in text image; do
  modality-circuits discover --model tiny-llava --task counting --modality "$modality" --n 16 --all-prompts "$@"
  modality-circuits evaluate --model tiny-llava --task counting --modality "$modality" --n 16 --all-prompts "$@"
done
