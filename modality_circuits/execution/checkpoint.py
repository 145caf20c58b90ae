"""Resumable work: a fingerprint of what a run computes, and a checkpoint file of its partial results."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from .store import atomic


def fingerprint(*parts) -> str:
    """A hash of tensors, numbers and strings (nested in lists, tuples and dicts) identifying a run."""
    digest = hashlib.sha256()

    def feed(x):
        if torch.is_tensor(x):
            digest.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            digest.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()  # hashed in place, no copy
                          if x.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            digest.update(f"L{len(x)}".encode())
            for y in x:
                feed(y)
        else:
            digest.update(repr(x).encode())

    feed(parts)
    return digest.hexdigest()


class Checkpoint:
    """A file of partial results (tensors, numbers, lists, dicts), keyed by a fingerprint of the run.

    Written atomically after each request; read with `torch.load(weights_only=True)`, which
    unpickles no arbitrary object, so a file handed to us cannot run code.
    """

    def __init__(self, path, key: str) -> None:
        self.path, self.key = Path(path), key

    def load(self) -> dict | None:
        """The stored state of this run, or None (no file, or a file of another run, which is then replaced)."""
        if not self.path.exists():
            return None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is refused the same way
            raise ValueError(f"{self.path} is not a checkpoint this package wrote ({type(err).__name__}); "
                             "delete it to start over") from None
        if not isinstance(data, dict) or "key" not in data or "state" not in data:
            raise ValueError(f"{self.path} is not a checkpoint this package wrote; delete it to start over")
        if data["key"] != self.key:
            warnings.warn(f"checkpoint {self.path} belongs to another run; starting over", RuntimeWarning, stacklevel=2)
            return None
        return data["state"]

    def save(self, state: dict) -> None:
        with atomic(self.path) as tmp:
            torch.save({"key": self.key, "state": state}, tmp)
