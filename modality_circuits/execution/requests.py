"""The one loop that splits every method's work into chunks and requests.

A method cuts its rows into chunks (`chunked`), then `requests` sends them
`model.chunks_per_request` at a time, one nnsight session each (one request when remote),
with a progress bar that moves per chunk when run here and per request when sent away;
`run` does that for a server body and collects its per-chunk results.
Each request is retried after a dropped connection (`VLM.call`).
"""
from __future__ import annotations

from typing import Callable, Iterator

from tqdm.auto import tqdm


def chunked(items: list, size: int) -> list[list]:
    """`items` in consecutive chunks of at most `size` (at least 1)."""
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


class _Ticking(list):
    """A request's work items, run here: a body's loop over them moves `bar` by units[i] once it is done with item i
    (the next item is asked for only after its traces ran). Never shipped: a server does not have this class."""

    def __init__(self, items: list, bar, units: list) -> None:
        super().__init__(items)
        self.bar, self.units = bar, units

    def __iter__(self):
        for item, n in zip(super().__iter__(), self.units):
            yield item
            self.bar.update(n)


def requests(model, chunks: list, *, desc: str | None = None, progress: bool = False, done: int = 0,
             units: list[int] | None = None, unit: str = "chunk") -> Iterator[tuple[list, Callable[[list], list]]]:
    """(group, send) for consecutive groups of `model.chunks_per_request` chunks, one request each: send(items) is
    what the request's body loops over, one item per chunk of the group (the chunks, or work built from them).

    The bar counts `unit`s: units[i] for chunk i (default 1), `done` of them finished before. Run in place
    (remote=False: no backend) send(items) advances it as the body's loop finishes each item inside the request's
    session, and within a chunk's forward (one forward may hold every chunk the memory budget allows, e.g. a whole
    faithfulness curve) its postfix names the decoder layer just computed; serialised (remote True, a host URL, or
    "local": the body and its items travel by value) send(items) is `items` itself and the bar moves once per
    request. The grouping, and so every forward and every number, is the same either way.
    """
    units = [1] * len(chunks) if units is None else list(units)
    bar = tqdm(total=done + sum(units), initial=done, desc=desc, unit=unit, disable=not progress, leave=False)
    ticking = progress and model.backend() is None  # the session runs in place: nothing of it is serialised
    layers = model.layers(model.hf_model) if ticking else []
    hooks = [layer.register_forward_hook(lambda *_, i=i: bar.set_postfix_str(f"layer {i + 1}/{len(layers)}"))
             for i, layer in enumerate(layers)]  # read nothing, change nothing
    end = done
    try:
        for start, group in zip(range(0, len(chunks), model.chunks_per_request),
                                chunked(chunks, model.chunks_per_request)):
            counts = units[start:start + len(group)]

            def send(items: list, counts=counts) -> list:
                return _Ticking(items, bar, counts) if ticking else items

            yield group, send
            end += sum(counts)
            bar.update(end - bar.n)  # what the body's loop did not count (all of it when sent away)
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


def run(model, body: Callable, chunks: list, *args, desc: str | None = None, progress: bool = False,
        units: list[int] | None = None, unit: str = "chunk") -> list:
    """[body's result for each chunk], sending body(model, group, *args) once per group of chunks."""
    return [r for group, send in requests(model, chunks, desc=desc, progress=progress, units=units, unit=unit)
            for r in model.call(body, send(group), *args)]
