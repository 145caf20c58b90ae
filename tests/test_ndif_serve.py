"""experiments/ndif/serve.sh: checks its ports (takes free ones when asked) and stops only its own processes."""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parents[1] / "experiments" / "ndif" / "serve.sh"
NAMES = ("API", "REDIS", "S3", "RAY_HEAD", "RAY_CLIENT", "DASHBOARD", "AGENT")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not Path("/proc").is_dir(), reason="bash and /proc")


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(state, *args, **env):
    return subprocess.run(["bash", str(SERVE), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "NDIF_STATE": str(state), **env})


def test_a_busy_port_is_refused_or_replaced_by_a_free_one(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {f"NDIF_{n}_PORT": str(_free()) for n in NAMES} | {"NDIF_API_PORT": str(port)}
        refused = _serve(tmp_path, "ports", **env)
        assert refused.returncode != 0
        assert f"port {port} (NDIF_API_PORT) is in use" in refused.stderr and "NDIF_FREE_PORTS=1" in refused.stderr
        taken = _serve(tmp_path, "ports", NDIF_FREE_PORTS="1", **env)
    assert taken.returncode == 0, taken.stderr
    chosen = dict(line.split("=") for line in taken.stdout.split())
    assert set(chosen) == {f"NDIF_{n}_PORT" for n in NAMES} and chosen["NDIF_API_PORT"] != str(port)
    assert len(set(chosen.values())) == len(NAMES)
    assert f"export NDIF_API_PORT={chosen['NDIF_API_PORT']}" in (tmp_path / "run" / "ports.env").read_text()


def test_stop_ends_only_the_processes_it_recorded(tmp_path):
    """A recorded Ray process of this state's session folder is ended; another Ray cluster's process, even with
    its pid in the record (a reused pid), is left alone; so is the machine's `ray`."""
    session = "/tmp/ray-ndif-" + hashlib.md5(str(tmp_path).encode()).hexdigest()[:8]
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    ours = subprocess.Popen([*sleeper, f"--session-dir={session}/session_1"])
    other = subprocess.Popen([*sleeper, "--session-dir=/tmp/ray/session_someone_else"])
    try:
        (tmp_path / "run").mkdir(parents=True)
        (tmp_path / "run" / "ray.pids").write_text(f"{ours.pid}\n{other.pid}\n")
        time.sleep(0.5)
        result = _serve(tmp_path, "stop")
        assert result.returncode == 0 and "stopped" in result.stdout, result.stderr
        assert ours.wait(timeout=10) is not None
        assert other.poll() is None
        assert "stop --force" not in SERVE.read_text()
    finally:
        for p in (ours, other):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
