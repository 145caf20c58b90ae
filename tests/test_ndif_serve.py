"""experiments/ndif/serve.sh: checks its ports (takes free ones when asked) and stops only its own processes."""
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
    """`stop` ends the session of each recorded service pid (every service starts as a session leader, so its
    children go with it) and nothing else: an unrecorded process of the machine is left alone; no `ray stop`."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    ours = subprocess.Popen(sleeper, start_new_session=True)
    other = subprocess.Popen(sleeper, start_new_session=True)
    try:
        (tmp_path / "run").mkdir(parents=True)
        (tmp_path / "run" / "ray.pid").write_text(f"{ours.pid}\n")
        time.sleep(0.5)
        result = _serve(tmp_path, "stop")
        assert result.returncode == 0 and "stopped" in result.stdout, result.stderr
        assert ours.wait(timeout=30) is not None
        assert other.poll() is None
        assert not (tmp_path / "run" / "ray.pid").exists()
        assert "stop --force" not in SERVE.read_text()
    finally:
        for p in (ours, other):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
