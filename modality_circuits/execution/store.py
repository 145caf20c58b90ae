"""Results on disk: atomic writes, so an interrupted run never leaves a half-written file."""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path


def check_writable(out: Path) -> None:
    """--out must be a folder this process can write (created if missing): checked before any work."""
    folder = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {folder} is not writable")


#: The file a run holds in its --out folder while it writes there (`lock`).
LOCK = ".modality_circuits.lock"


class FolderInUse(RuntimeError):
    """Another live run holds the results folder's lock."""


@contextlib.contextmanager
def atomic(path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The file gets the mode an ordinary new file gets (0644 under the usual umask 022), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def lock(folder):
    """Hold <folder>/.modality_circuits.lock (this process's pid, host and start time) while a run writes `folder`.

    A second run on the same folder is refused (FolderInUse) while the holder lives; a lock whose process
    is gone (killed, crashed) is stale and taken over. Released on exit, errors and Ctrl-C included."""
    path = Path(folder) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:  # stale: its process is gone
                path.unlink(missing_ok=True)
                continue
            raise FolderInUse(f"{folder} is in use by another run (pid {holder.get('pid')} on {holder.get('host')} "
                              f"since {holder.get('since')}): wait for it to finish or give another --out "
                              f"(if no such run exists, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()


def _holder(path: Path) -> dict | None:
    """The lock's holder, or None when the lock is stale (its process no longer runs on this host)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):  # being written right now, or garbage: stale only once it is old
        try:
            return None if time.time() - path.stat().st_mtime > 60 else {"pid": "?", "host": "?", "since": "now"}
        except OSError:
            return None
    if holder.get("host") != socket.gethostname():
        return holder  # another machine's process cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, TypeError, ValueError):  # gone, or not a lock this package wrote
        return None
    except PermissionError:  # another user's live process
        return holder
    return holder


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _strict(obj):
    """`obj` for strict JSON: numbers that are not plain JSON (numpy, 0-d tensors) as float, nan and inf as None."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    value = float(obj)
    return value if math.isfinite(value) else None


def write_json(path, obj) -> None:
    """Strict JSON (atomically): an undefined number (nan, inf) is written as null, which readers treat as undefined."""
    text = json.dumps(_strict(obj), indent=2, allow_nan=False)
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def read_json(path):
    """A JSON record; a damaged one is a ValueError naming the file."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): restore it, or delete it and rerun the step that "
                             "writes it") from None


def nan_for_null(obj):
    """`obj` (read from a file of numbers) with every null, an undefined number, as nan, recursively."""
    if isinstance(obj, dict):
        return {k: nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_for_null(v) for v in obj]
    return float("nan") if obj is None else obj


def model_dir(out, model_name: str) -> Path:
    """results/<model>/ with the model name made path-safe."""
    return Path(out) / model_name.replace("/", "--")
