"""The one loop that splits every method's work into chunks and requests.

A method cuts its rows into chunks (`chunked`), then `requests` sends them
`model.chunks_per_request` at a time, one nnsight session each (one request when remote),
with a progress bar; `run` does that for a server body and collects its per-chunk results.
Each request is retried after a dropped connection (`VLM.call`).
"""
from __future__ import annotations

from typing import Callable, Iterator

from tqdm.auto import tqdm


def chunked(items: list, size: int) -> list[list]:
    """`items` in consecutive chunks of at most `size` (at least 1)."""
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


def requests(model, chunks: list, *, desc: str | None = None, progress: bool = False, done: int = 0) -> Iterator[list]:
    """Consecutive groups of `model.chunks_per_request` chunks, one request each; `done` chunks were sent before."""
    bar = tqdm(total=done + len(chunks), initial=done, desc=desc, disable=not progress, leave=False)
    try:
        for group in chunked(chunks, model.chunks_per_request):
            yield group
            bar.update(len(group))
    finally:
        bar.close()


def run(model, body: Callable, chunks: list, *args, desc: str | None = None, progress: bool = False) -> list:
    """[body's result for each chunk], sending body(model, group, *args) once per group of chunks."""
    return [r for group in requests(model, chunks, desc=desc, progress=progress) for r in model.call(body, group, *args)]
