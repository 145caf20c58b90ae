"""Checks on the numbers a run makes: a nan or inf stops the run at the step that produced it."""
from __future__ import annotations

import torch


def finite(tensor: torch.Tensor, step: str, model=None) -> torch.Tensor:
    """`tensor` unchanged, or a FloatingPointError naming `step`, the model's dtype and the likely cause.

    Called where results come back from a trace (never inside a `@server_body`)."""
    bad = ~torch.isfinite(tensor)
    if not bad.any():
        return tensor
    where = ""
    if model is not None:
        dtype = str(model.dtype).removeprefix("torch.")
        where = f" on {model.name} ({dtype})"
        if model.dtype == torch.float16:
            hint = "float16 overflows easily: load the model with dtype='bfloat16' or 'float32'"
        else:
            hint = "a weight or an input of the model is probably nan or inf"
    else:
        hint = "they were computed from a model that overflowed or holds a nan weight; recompute them"
    raise FloatingPointError(f"{step}: {int(bad.sum())} of {tensor.numel()} values are nan or inf{where}; {hint}")
