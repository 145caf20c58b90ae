"""Resumable work: a fingerprint of what a run computes, and a checkpoint file of its partial results."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    """A file of partial results, keyed by a fingerprint of the run: safetensors, never a pickle.

    The state is a dict of tensors (or None), ints, and lists of tensor tuples (`kept`); it is written
    atomically after each request, tensors by name and everything else in the JSON metadata.
    """

    def __init__(self, path, key: str) -> None:
        self.path, self.key = Path(path), key

    def load(self) -> dict | None:
        """The stored state of this run, or None (no file, or a file of another run, which is then replaced)."""
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads((f.metadata() or {})["modality_circuits_checkpoint"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # noqa: BLE001 - any unreadable or foreign file is refused the same way
            raise ValueError(f"{self.path} is not a checkpoint this package wrote ({type(err).__name__}); "
                             "delete it to start over") from None
        if meta.get("key") != self.key:
            warnings.warn(f"checkpoint {self.path} belongs to another run; starting over", RuntimeWarning, stacklevel=2)
            return None
        state = {k: tensors.get(k) for k in meta["tensors"]}
        state.update(meta["numbers"])
        state.update({k: [tuple(tensors[f"{k}.{i}.{j}"] for j in range(width)) for i in range(count)]
                      for k, (count, width) in meta["lists"].items()})
        return state

    def save(self, state: dict) -> None:
        tensors, meta = {}, {"key": self.key, "tensors": [], "numbers": {}, "lists": {}}
        for k, v in state.items():
            if v is None or torch.is_tensor(v):
                meta["tensors"].append(k)
                if v is not None:
                    tensors[k] = v.detach().cpu().contiguous()
            elif isinstance(v, list):
                meta["lists"][k] = (len(v), len(v[0]) if v else 0)
                tensors.update({f"{k}.{i}.{j}": t.detach().cpu().contiguous() for i, row in enumerate(v)
                                for j, t in enumerate(row)})
            else:
                meta["numbers"][k] = v
        with atomic(self.path) as tmp:
            save_file(tensors, tmp, metadata={"modality_circuits_checkpoint": json.dumps(meta)})
