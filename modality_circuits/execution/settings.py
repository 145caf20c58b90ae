"""Where and how a model's work runs: the remote setting, retries, requests and the memory budget, in one object."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import remote as _remote
from .budget import parse as parse_budget


@dataclass(frozen=True)
class Settings:
    """How every algorithm runs a model's traces (`VLM.settings`).

    remote: False (here), True (the configured NDIF host), a host URL, or "local" (the serialisation dry run);
    execution/remote.py. retries, retry_backoff: a request that fails on a dropped connection is sent again up to
    `retries` times, waiting retry_backoff · 2^i seconds before retry i. chunks_per_request: chunks of work in one
    request (one nnsight session). memory_budget: bytes, e.g. "40GB", or "auto"; bounds the rows of every
    forward (execution/budget.py).
    """

    remote: Any = False
    retries: int = 3
    retry_backoff: float = 2.0
    chunks_per_request: int = 8
    memory_budget: int | str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "remote", _remote.normalize(self.remote))
        object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget))
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if not isinstance(self.retry_backoff, (int, float)) or self.retry_backoff < 0:
            raise ValueError(f"retry_backoff must be a number of seconds >= 0, got {self.retry_backoff!r}")
        if isinstance(self.chunks_per_request, bool) or not isinstance(self.chunks_per_request, int) \
                or self.chunks_per_request < 1:
            raise ValueError(f"chunks_per_request must be an integer >= 1, got {self.chunks_per_request!r}")

    def replace(self, **changes) -> "Settings":
        """These settings with `changes` (checked like new ones)."""
        return dataclasses.replace(self, **changes)


#: The names of the settings, which `VLM` also takes as keywords and attributes (older code uses them).
NAMES = tuple(f.name for f in dataclasses.fields(Settings))
