#!/usr/bin/env bash
# GPU check (about 5-8 minutes on one H100/H200): the real Qwen2-VL-7B architecture at FULL depth (28 decoder
# layers, 32 vision layers, random bf16 weights built on the GPU) measured by experiments/bench_scale.py against
# its plain-PyTorch floor (CUDA peak memory, wall time after torch.cuda.synchronize), then the test suite.
# 4 pairs (24 IG rows); the int logits_to_keep=1 path the package avoids (it copies lm_head's weight per row) is
# skipped. A FAILED step is itself a finding. Not covered: device_map="auto" (the bench builds on one device).
#
#     bash experiments/gpu_check.sh          # from anywhere; figures also go to $OUT (or /tmp) as JSON
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh   # creates or reuses .venv; installs torch only where none is (no CUDA build is forced)
set +e                    # setup.sh turns on errexit: report each step's status instead of stopping
out="${OUT:-/tmp}"
status=0

echo "== machine =="
nvidia-smi || echo "nvidia-smi failed: no NVIDIA driver visible"
python - <<'PY'
import torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available: {ok}"
      + (f", {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if ok else ""))
PY

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== bench_scale: qwen2_vl, full depth, cuda (limit 300 s) =="
  timeout 300 python experiments/bench_scale.py --device cuda --layers 28 --vision-layers 32 --models qwen2_vl \
    --pairs 4 --repeats 2 --skip logits_keep1 --json "$out/bench_scale_cuda_qwen2_vl.json"
  rc=$?; echo "bench_scale exit status: $rc"; [ "$rc" -eq 0 ] || status=1
else
  echo "== bench_scale skipped: this torch has no CUDA (install a CUDA build of torch into .venv and rerun) =="
  status=1
fi

echo "== tests (limit 240 s) =="
timeout 240 python -m pytest -q -x tests
rc=$?; echo "pytest exit status: $rc"; [ "$rc" -eq 0 ] || status=1
exit "$status"
