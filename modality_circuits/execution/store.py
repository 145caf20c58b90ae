"""Results on disk: atomic writes, so an interrupted run never leaves a half-written file."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path


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
    with open(path) as f:
        return json.load(f)


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
