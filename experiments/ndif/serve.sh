#!/usr/bin/env bash
# A real NDIF 0.1.2 server on this CPU-only machine, loopback only, serving a model folder to
# modality_circuits with remote=True — the end-to-end check of remote execution.
#   bash experiments/ndif/serve.sh install   # server venv + redis (once; 445 s on a loaded 2-core machine)
#   bash experiments/ndif/serve.sh start     # redis, moto S3, ray head (one fake GPU), controller, API on 127.0.0.1:8001
#   bash experiments/ndif/serve.sh e2e       # install if needed, start, run every algorithm remotely vs locally, stop;
#                                            # writes results/ndif/e2e.json ($NDIF_E2E_JSON)
#   bash experiments/ndif/serve.sh stop | status | ports
# Exit status: 0 every algorithm ran remotely with the local numbers; 1 a remote run failed or differed;
# 3 the server could not be installed or started here (the reason and the log lines that explain it are printed).
# The client runs in $MC_PYTHON if set, else in the repository's .venv (scripts/setup.sh).
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
  command -v redis-server >/dev/null || apt-get install -y -qq redis-server >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } || return 1
  [ -x "$V/bin/python" ] || python3 -m venv "$V" || return 1
  "$V/bin/pip" install -q torch==2.13.0 || return 1
  # ndif declares Requires-Python>=3.12 but runs on 3.11; numpy<2.4 keeps a binary wheel
  "$V/bin/pip" install -q --prefer-binary --ignore-requires-python \
      'ndif[api,ray]==0.1.2' 'nnsight==0.8.0' 'transformers>=5.22,<5.23' 'numpy<2.4' 'moto[server]' pillow torch==2.13.0 \
      || return 1
  patch_venv
}

patch_venv() {  # the CPU shims: one light .pth line; the shims load only where nnsight's model loading is imported
  local sp
  sp=$("$V/bin/python" -c "import site;print(site.getsitepackages()[0])")
  rm -f "$sp/ndif_cpu_patch_path.pth" "$sp/zz_ndif_cpu_patch.pth"  # older installs imported torch in every interpreter
  printf '%s\nimport ndif_cpu_patch\n' "$HERE" > "$sp/ndif_cpu_patch.pth"
}

bg() {  # a background service as the leader of its own session (stop ends that session only): pid in $RUN/$1.pid
  local n=$1; shift
  nohup setsid "$@" >"$RUN/$n.log" 2>&1 < /dev/null & echo $! >"$RUN/$n.pid"
  disown  # stop's SIGKILL of a slow service is no news
}
wait_port() { for _ in $(seq 1 "${3:-60}"); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 1; done; echo "port $1:$2 not up"; return 1; }

explain() {  # the last lines of the named service logs, and the error lines of Ray's own logs
  local n f
  for n in "$@"; do
    [ -s "$RUN/$n.log" ] && { echo "---- $RUN/$n.log (last 25 lines) ----"; tail -n 25 "$RUN/$n.log"; }
  done
  if [ -d "$RAY_TMP/session_latest/logs" ]; then
    for f in $(grep -l -s -E "Traceback|Error|FATAL|Timed out|timed out" "$RAY_TMP"/session_latest/logs/*.{err,out,log} | tail -n 4); do
      echo "---- $f (error lines) ----"; grep -E -A3 "Traceback|Error|FATAL|Timed out|timed out" "$f" | tail -n 15
    done
  fi
} >&2

cannot() { echo "cannot start the NDIF server: $1" >&2; shift; explain "$@"; stop >/dev/null; exit 3; }  # stops what started

ports() { choose_ports && use_ports && for name in $PORTS; do var="NDIF_${name}_PORT"; echo "$var=${!var}"; done; }

start() {
  export PATH="$V/bin:$PATH"
  if ls "$RUN"/*.pid >/dev/null 2>&1; then
    echo "a server of $STATE is already running (pids in $RUN): stop it first" >&2; return 1
  fi
  choose_ports && use_ports || cannot "a port it needs is in use" 
  patch_venv
  bg redis redis-server --bind 127.0.0.1 --port "$NDIF_REDIS_PORT" --daemonize no --save '' --appendonly no
  bg s3 "$V/bin/moto_server" -H 127.0.0.1 -p "$NDIF_S3_PORT"
  wait_port 127.0.0.1 "$NDIF_REDIS_PORT" || cannot "redis did not listen on 127.0.0.1:$NDIF_REDIS_PORT" redis
  wait_port 127.0.0.1 "$NDIF_S3_PORT" || cannot "moto_server did not listen on 127.0.0.1:$NDIF_S3_PORT" s3
  MEM=$("$V/bin/python" -c "import psutil;print(int(psutil.virtual_memory().total))")
  RES="{\"head\": 10, \"cuda_memory_bytes\": $((8*1024*1024*1024)), \"cpu_memory_bytes\": $MEM}"
  bg ray "$V/bin/ray" start --head --block --node-ip-address=127.0.0.1 --num-cpus=4 --num-gpus=1 --resources="$RES" \
      --port="$NDIF_RAY_HEAD_PORT" --ray-client-server-port="$NDIF_RAY_CLIENT_PORT" --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$NDIF_DASHBOARD_PORT" --dashboard-agent-listen-port="$NDIF_AGENT_PORT" --temp-dir="$RAY_TMP" --disable-usage-stats
  for _ in $(seq 1 "${NDIF_RAY_START_S:-180}"); do
    grep -q "Ray runtime started" "$RUN/ray.log" 2>/dev/null && break
    kill -0 "$(cat "$RUN/ray.pid")" 2>/dev/null || cannot "ray start exited" ray
    sleep 1
  done
  grep -q "Ray runtime started" "$RUN/ray.log" || cannot "Ray did not start within ${NDIF_RAY_START_S:-180} s" ray
  wait_port 127.0.0.1 "$NDIF_RAY_CLIENT_PORT" 120 || cannot "Ray's client server did not listen on 127.0.0.1:$NDIF_RAY_CLIENT_PORT" ray
  RAY_ADDRESS=127.0.0.1:$NDIF_RAY_HEAD_PORT timeout 600 "$V/bin/python" -m ndif.services.ray.deployments.controller.controller \
      >"$RUN/controller.log" 2>&1 || cannot "the NDIF controller did not deploy" controller ray
  NDIF_SERVICE=api bg api "$V/bin/gunicorn" --config python:ndif.services.api.gunicorn_conf \
      --bind 127.0.0.1:$NDIF_API_PORT ndif.services.api.app:app
  wait_port 127.0.0.1 $NDIF_API_PORT 120 || cannot "the API did not listen on 127.0.0.1:$NDIF_API_PORT" api
  for _ in $(seq 1 90); do curl -sf http://127.0.0.1:$NDIF_API_PORT/status >/dev/null && break; sleep 2; done
  curl -sf http://127.0.0.1:$NDIF_API_PORT/status >/dev/null || cannot "the API did not report its status" api controller
  echo "NDIF ready on http://127.0.0.1:$NDIF_API_PORT"
}

stop() {  # only what start started: the session of each recorded pid (bg starts each service as a session leader)
  local n pid
  for n in api ray s3 redis; do
    [ -f "$RUN/$n.pid" ] || continue
    pid=$(cat "$RUN/$n.pid")
    pkill -TERM -s "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do pgrep -s "$pid" >/dev/null || break; sleep 1; done
    pkill -KILL -s "$pid" 2>/dev/null || true
    rm -f "$RUN/$n.pid"
  done
  rm -f "$RUN/ports.env"
  echo stopped
}

use_ports
status() { curl -s http://127.0.0.1:$NDIF_API_PORT/ping; echo; curl -s http://127.0.0.1:$NDIF_API_PORT/status | head -c 2000; echo; }

e2e() {  # every algorithm on the server vs locally, for tiny LLaVA and Gemma-3 folders and the embedded toy
  local began=$SECONDS failed=0 family server
  if [ -n "${MC_PYTHON:-}" ]; then py=$MC_PYTHON; else source "$ROOT/scripts/setup.sh"; fi
  [ -x "$V/bin/gunicorn" ] || install || cannot "the server venv could not be installed (see the pip output above)"
  local installed=$((SECONDS - began))
  trap stop EXIT
  trap 'exit 124' TERM INT  # a time limit still stops what was started
  start
  local started=$((SECONDS - began))
  for family in llava gemma3; do
    "$py" "$ROOT/experiments/ndif_local_server.py" --save-tiny "$family" "$STATE/models/tiny-$family"
  done
  server=$("$V/bin/python" -c 'import importlib.metadata as m, platform
print(f"python {platform.python_version()}, " + ", ".join(f"{p} {m.version(p)}" for p in ("ndif", "nnsight", "ray", "torch", "transformers")))')
  "$py" "$ROOT/experiments/ndif_local_server.py" --host "http://127.0.0.1:$NDIF_API_PORT" --wording toy \
      --model "$STATE/models/tiny-llava" "$STATE/models/tiny-gemma3" "$ROOT/modality_circuits/zoo/toy_vlm" \
      --json "${NDIF_E2E_JSON:-$ROOT/results/ndif/e2e.json}" --note "server=$server" \
      --note "install_s=$installed" --note "start_s=$((started - installed))" --note "machine=$(getconf _NPROCESSORS_ONLN) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" \
      || failed=1
  echo "e2e: $((SECONDS - began)) s in all (install $installed s, start $((started - installed)) s)"
  [ "$failed" = 0 ] || { explain api controller; exit 1; }
}

"${1:-e2e}"; exit  # on one line: bash has read it all, so editing this file mid-run is harmless
