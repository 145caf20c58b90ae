#!/usr/bin/env bash
# A real NDIF 0.1.2 server on this CPU-only machine, loopback only, serving a model folder to
# modality_circuits with remote=True — the end-to-end check of remote execution.
#   bash experiments/ndif/serve.sh install   # server venv + redis (once, ~2 min)
#   bash experiments/ndif/serve.sh start     # redis, moto S3, ray head (one fake GPU), controller, API on 127.0.0.1:8001
#   bash experiments/ndif/serve.sh e2e       # install if needed, start, run every algorithm remotely vs locally, stop
#   bash experiments/ndif/serve.sh stop | status
# What had to be worked around (details below and in ndif_cpu_patch.py): ndif wants Python >= 3.12
# (its code runs on 3.11), a GPU (a CPU model actor, ndif_cpu_patch.py), the rustfs object store
# (moto_server instead), and Ray must be kept on 127.0.0.1.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${NDIF_STATE:-$ROOT/.ndif}"
V="${NDIF_SERVER_VENV:-$STATE/server-venv}"; RUN="$STATE/run"; mkdir -p "$RUN"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 GRPC_ENABLE_FORK_SUPPORT=0
export NDIF_REDIS_URL=redis://127.0.0.1:6379
export NDIF_OBJECT_STORE_URL=http://127.0.0.1:9000
export NDIF_RAY_ADDRESS=ray://127.0.0.1:10001
export NDIF_RAY_HEAD_PORT=6385
export NDIF_API_PORT=8001
export NDIF_MODEL_IMPORT_PATH=ndif_cpu_patch.CPUModelActor
export NDIF_DEFAULT_DTYPE=${NDIF_DEFAULT_DTYPE:-float32}
export NDIF_DEFAULT_PADDING_BIAS=$((64*1024*1024))
export NDIF_CONTROLLER_SYNC_INTERVAL_S=${NDIF_CONTROLLER_SYNC_INTERVAL_S:-5}
export NDIF_DEPLOYMENTS=${NDIF_DEPLOYMENTS:-}

install() {
  command -v redis-server >/dev/null || apt-get install -y -qq redis-server >/dev/null
  [ -x "$V/bin/python" ] || python3 -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0
  # ndif declares Requires-Python>=3.12 but runs on 3.11; numpy<2.4 keeps a binary wheel
  "$V/bin/pip" install -q --prefer-binary --ignore-requires-python \
      'ndif[api,ray]==0.1.2' 'nnsight==0.8.0' 'transformers>=5.22,<5.23' 'numpy<2.4' 'moto[server]' pillow torch==2.13.0
  SP=$("$V/bin/python" -c "import site;print(site.getsitepackages()[0])")
  echo "$HERE" > "$SP/ndif_cpu_patch_path.pth"
  echo "import ndif_cpu_patch" > "$SP/zz_ndif_cpu_patch.pth"
}

bg() { local n=$1; shift; nohup "$@" >"$RUN/$n.log" 2>&1 & echo $! >"$RUN/$n.pid"; }
wait_port() { for _ in $(seq 1 "${3:-60}"); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 1; done; echo "port $1:$2 not up"; return 1; }

start() {
  export PATH="$V/bin:$PATH"
  bg redis redis-server --bind 127.0.0.1 --port 6379 --daemonize no --save '' --appendonly no
  bg s3 "$V/bin/moto_server" -H 127.0.0.1 -p 9000
  wait_port 127.0.0.1 6379; wait_port 127.0.0.1 9000
  MEM=$("$V/bin/python" -c "import psutil;print(int(psutil.virtual_memory().total))")
  RES="{\"head\": 10, \"cuda_memory_bytes\": $((8*1024*1024*1024)), \"cpu_memory_bytes\": $MEM}"
  ray start --head --node-ip-address=127.0.0.1 --num-cpus=4 --num-gpus=1 --resources="$RES" \
      --port=$NDIF_RAY_HEAD_PORT --ray-client-server-port=10001 --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port=8265 --temp-dir=/tmp/ray --disable-usage-stats >"$RUN/ray.log" 2>&1
  RAY_ADDRESS=127.0.0.1:$NDIF_RAY_HEAD_PORT "$V/bin/python" -m ndif.services.ray.deployments.controller.controller >"$RUN/controller.log" 2>&1
  NDIF_SERVICE=api bg api "$V/bin/gunicorn" --config python:ndif.services.api.gunicorn_conf \
      --bind 127.0.0.1:$NDIF_API_PORT ndif.services.api.app:app
  wait_port 127.0.0.1 $NDIF_API_PORT 120
  for _ in $(seq 1 90); do curl -sf http://127.0.0.1:$NDIF_API_PORT/status >/dev/null && break; sleep 2; done
  curl -sf http://127.0.0.1:$NDIF_API_PORT/status >/dev/null || { echo "API not ready, see $RUN/*.log"; return 1; }
  echo "NDIF ready on http://127.0.0.1:$NDIF_API_PORT"
}

stop() {
  for n in api s3 redis; do
    if [ -f "$RUN/$n.pid" ]; then
      pid=$(cat "$RUN/$n.pid")
      for c in $(pgrep -P "$pid" 2>/dev/null); do kill -9 "$c" 2>/dev/null || true; done  # gunicorn's dispatcher
      kill "$pid" 2>/dev/null || true; sleep 1; kill -9 "$pid" 2>/dev/null || true
      rm -f "$RUN/$n.pid"
    fi
  done
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$V/bin/ray" stop --force >/dev/null 2>&1 || true
  echo stopped
}

status() { curl -s http://127.0.0.1:$NDIF_API_PORT/ping; echo; curl -s http://127.0.0.1:$NDIF_API_PORT/status | head -c 2000; echo; }

e2e() {  # every algorithm on the server vs locally, for tiny LLaVA and Gemma-3 folders (and the toy model if shipped)
  source "$ROOT/scripts/setup.sh"
  [ -x "$V/bin/gunicorn" ] || install
  start
  trap stop EXIT
  for family in llava gemma3; do
    "$py" "$ROOT/experiments/ndif_local_server.py" --save-tiny "$family" "$STATE/models/tiny-$family"
    "$py" "$ROOT/experiments/ndif_local_server.py" --model "$STATE/models/tiny-$family" --host "http://127.0.0.1:$NDIF_API_PORT"
  done
  toy="$ROOT/modality_circuits/zoo/toy_vlm"
  if [ -f "$toy/config.json" ]; then
    "$py" "$ROOT/experiments/ndif_local_server.py" --model "$toy" --host "http://127.0.0.1:$NDIF_API_PORT"
  fi
}

"${1:-e2e}"
