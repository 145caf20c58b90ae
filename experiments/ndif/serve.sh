#!/usr/bin/env bash
# A real NDIF 0.1.2 server on this CPU-only machine, loopback only, serving a model folder to
# modality_circuits with remote=True — the end-to-end check of remote execution.
#   bash experiments/ndif/serve.sh install   # server venv + redis (once, ~2 min)
#   bash experiments/ndif/serve.sh start     # redis, moto S3, ray head (one fake GPU), controller, API on 127.0.0.1:8001
#   bash experiments/ndif/serve.sh e2e       # install if needed, start, run every algorithm remotely vs locally, stop
#   bash experiments/ndif/serve.sh stop | status | ports
# Ports (NDIF_API_PORT, NDIF_REDIS_PORT, NDIF_S3_PORT, NDIF_RAY_HEAD_PORT, NDIF_RAY_CLIENT_PORT, NDIF_DASHBOARD_PORT,
# NDIF_AGENT_PORT) are checked before start: a busy one stops it, or with NDIF_FREE_PORTS=1 a free one is taken;
# the ports in use are kept in $NDIF_STATE/run/ports.env. `stop` ends only the processes this script started
# (pids recorded in $NDIF_STATE/run/), never other Ray clusters of the machine.
# What had to be worked around (details in experiments/ndif/README.md): ndif wants Python >= 3.12
# (its code runs on 3.11), a GPU (a CPU model actor, ndif_cpu_patch.py), the rustfs object store
# (moto_server instead), and Ray must be kept on 127.0.0.1.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${NDIF_STATE:-$ROOT/.ndif}"
V="${NDIF_SERVER_VENV:-$STATE/server-venv}"; RUN="$STATE/run"; mkdir -p "$RUN"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 GRPC_ENABLE_FORK_SUPPORT=0
PORTS="API REDIS S3 RAY_HEAD RAY_CLIENT DASHBOARD AGENT"
declare -A DEFAULT_PORT=([API]=8001 [REDIS]=6379 [S3]=9000 [RAY_HEAD]=6385 [RAY_CLIENT]=10001 [DASHBOARD]=8265 [AGENT]=52365)
RAY_TMP="/tmp/ray-ndif-$(printf %s "$STATE" | md5sum | cut -c1-8)"  # this state's own Ray session folder

busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
choose_ports() {  # NDIF_<NAME>_PORT or the default; a busy port is an error unless NDIF_FREE_PORTS=1
  local name var port taken=""
  : >"$RUN/ports.env.tmp"
  for name in $PORTS; do
    var="NDIF_${name}_PORT"; port="${!var:-${DEFAULT_PORT[$name]}}"
    if busy "$port" || [[ " $taken " == *" $port "* ]]; then
      if [ "${NDIF_FREE_PORTS:-0}" != 1 ]; then
        echo "port $port ($var) is in use: set $var to a free port, or NDIF_FREE_PORTS=1 to take free ones" >&2
        rm -f "$RUN/ports.env.tmp"; return 1
      fi
      port=$(free_port)
    fi
    taken="$taken $port"; echo "export $var=$port" >>"$RUN/ports.env.tmp"
  done
  mv "$RUN/ports.env.tmp" "$RUN/ports.env"
}
use_ports() {  # the chosen ports (ports.env, else the defaults) and the URLs built from them
  local name var
  for name in $PORTS; do var="NDIF_${name}_PORT"; export "$var=${!var:-${DEFAULT_PORT[$name]}}"; done
  [ -f "$RUN/ports.env" ] && source "$RUN/ports.env"
  export NDIF_REDIS_URL=redis://127.0.0.1:$NDIF_REDIS_PORT NDIF_OBJECT_STORE_URL=http://127.0.0.1:$NDIF_S3_PORT
  export NDIF_RAY_ADDRESS=ray://127.0.0.1:$NDIF_RAY_CLIENT_PORT
}
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

ports() { choose_ports && use_ports && for name in $PORTS; do var="NDIF_${name}_PORT"; echo "$var=${!var}"; done; }

start() {
  export PATH="$V/bin:$PATH"
  if [ -f "$RUN/ray.pids" ] || ls "$RUN"/*.pid >/dev/null 2>&1; then
    echo "a server of $STATE is already running (pids in $RUN): stop it first" >&2; return 1
  fi
  choose_ports && use_ports
  bg redis redis-server --bind 127.0.0.1 --port "$NDIF_REDIS_PORT" --daemonize no --save '' --appendonly no
  bg s3 "$V/bin/moto_server" -H 127.0.0.1 -p "$NDIF_S3_PORT"
  wait_port 127.0.0.1 "$NDIF_REDIS_PORT"; wait_port 127.0.0.1 "$NDIF_S3_PORT"
  MEM=$("$V/bin/python" -c "import psutil;print(int(psutil.virtual_memory().total))")
  RES="{\"head\": 10, \"cuda_memory_bytes\": $((8*1024*1024*1024)), \"cpu_memory_bytes\": $MEM}"
  ray start --head --node-ip-address=127.0.0.1 --num-cpus=4 --num-gpus=1 --resources="$RES" \
      --port="$NDIF_RAY_HEAD_PORT" --ray-client-server-port="$NDIF_RAY_CLIENT_PORT" --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$NDIF_DASHBOARD_PORT" \
      --dashboard-agent-listen-port="$NDIF_AGENT_PORT" --temp-dir="$RAY_TMP" --disable-usage-stats >"$RUN/ray.log" 2>&1
  record_ray  # before anything else can fail: `stop` ends these
  RAY_ADDRESS=127.0.0.1:$NDIF_RAY_HEAD_PORT "$V/bin/python" -m ndif.services.ray.deployments.controller.controller >"$RUN/controller.log" 2>&1
  NDIF_SERVICE=api bg api "$V/bin/gunicorn" --config python:ndif.services.api.gunicorn_conf \
      --bind 127.0.0.1:$NDIF_API_PORT ndif.services.api.app:app
  wait_port 127.0.0.1 "$NDIF_API_PORT" 120
  for _ in $(seq 1 90); do curl -sf http://127.0.0.1:$NDIF_API_PORT/status >/dev/null && break; sleep 2; done
  curl -sf http://127.0.0.1:$NDIF_API_PORT/status >/dev/null || { echo "API not ready, see $RUN/*.log"; return 1; }
  echo "NDIF ready on http://127.0.0.1:$NDIF_API_PORT"
}

record_ray() {  # the pids of this cluster's processes: those whose command line names its own session folder
  local pid
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$RAY_TMP" && echo "$pid"
  done >"$RUN/ray.pids" || true
}

ours() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"; }  # pid $1 still runs a command naming $2

stop() {  # only what start recorded; a recorded pid now running something else (reused) is left alone
  local n pid c
  for n in api s3 redis; do
    if [ -f "$RUN/$n.pid" ]; then
      pid=$(cat "$RUN/$n.pid")
      for c in $(pgrep -P "$pid" 2>/dev/null); do kill -9 "$c" 2>/dev/null || true; done  # gunicorn's dispatcher
      kill "$pid" 2>/dev/null || true; sleep 1; kill -9 "$pid" 2>/dev/null || true
      rm -f "$RUN/$n.pid"
    fi
  done
  if [ -f "$RUN/ray.pids" ]; then
    record_ray  # again: the workers Ray started since (their command lines name the same session folder)
    for pid in $(cat "$RUN/ray.pids"); do ours "$pid" "$RAY_TMP" && kill "$pid" 2>/dev/null || true; done
    sleep 2
    for pid in $(cat "$RUN/ray.pids"); do ours "$pid" "$RAY_TMP" && kill -9 "$pid" 2>/dev/null || true; done
    rm -f "$RUN/ray.pids"
  fi
  rm -f "$RUN/ports.env"
  echo stopped
}

use_ports
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
  toy="$ROOT/modality_circuits/toy_vlm"
  if [ -f "$toy/config.json" ]; then
    "$py" "$ROOT/experiments/ndif_local_server.py" --model "$toy" --host "http://127.0.0.1:$NDIF_API_PORT"
  fi
}

"${1:-e2e}"
