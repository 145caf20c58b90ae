"""The pieces every server body shares, written once. THIS CODE RUNS ON AN NDIF SERVER.

The `@server_body` functions (execution/remote.py) call these inside their trace blocks. A server does
not have this package, so this module is shipped with every request by value: execution/remote.py
registers it with `nnsight.register` (cloudpickle's `register_pickle_by_value`, which nnsight's
serialiser honours), and each function travels as its source. Hence the rule for this file: torch,
builtins and envoys only, no import of this package, no module-level state.
"""
from __future__ import annotations

import torch


def decoder_inputs(layers, stack, keys: tuple, inject: bool, dtype=None):
    """Inside an embedding trace: (e, g) where e is the decoder input (rows, T, d) and g (n, rows, T, d) the visual
    features added after the first n layers at the image positions (zero elsewhere), or None without injections.

    e is a copy in the model's dtype, or cast to `dtype` (e.g. float32); g has e's dtype and device. The features are
    read from the decoder stack's keyword inputs `keys` = (features, image-position mask), before layer 0 runs.
    """
    if inject:  # docs/method.md section 13
        kwargs = stack.inputs[1]
        feats, where = torch.stack(kwargs[keys[0]]), kwargs[keys[1]]
    e = layers[0].input.clone() if dtype is None else layers[0].input.to(dtype)
    if not inject:
        return e, None
    g = e.new_zeros(len(feats), *e.shape)
    g[:, where.to(e.device)] = feats.to(e.device, e.dtype)
    return e, g


def embed_pass(root, inputs: dict, opts: dict, layers, stack, keys: tuple, inject: bool, dtype=None, moe=None):
    """In a session: one trace of `inputs` (p' rows, then p rows) stopped at decoder layer 0, giving
    `decoder_inputs`' (e, g) (the vision tower runs here, once per prompt; every later row starts from e).

    moe: per layer its experts' envoy (None for a dense layer). With a sparse layer the trace runs to the end and
    (e, g, held) is returned, held[i] = the p rows' routing at layer i, ((P·T, k) indices, weights) or None:
    every later row is routed as its prompt p (docs/families-2026.md)."""
    sparse = moe is not None and any(m is not None for m in moe)
    held = [None] * len(layers)
    with root.trace(**inputs, **opts) as embed:
        e, g = decoder_inputs(layers, stack, keys, inject, dtype)
        for i in range(len(layers) if sparse else 0):
            if moe[i] is not None:
                (_, top, w), _ = moe[i].inputs
                half = top.shape[0] // 2  # the p rows' tokens
                held[i] = (top[half:].clone(), w[half:].detach().clone())
        if not sparse:
            embed.stop()
    return (e, g) if moe is None else (e, g, held)


def route_as_held(experts, held: tuple, P: int, n: int) -> None:
    """Inside a trace of P p' rows then n·P p rows: route every row at this sparse layer as its prompt p
    (`embed_pass`'s held routing of the P prompts, repeated)."""
    (h, _, _), kw = experts.inputs
    experts.inputs = ((h, *(v.view(P, -1, v.shape[-1]).repeat(n + 1, 1, 1).view(-1, v.shape[-1]).to(h.device)
                           for v in held)), kw)


def repeat_rows(x: torch.Tensor, P: int, n: int) -> torch.Tensor:
    """The P counterfactual rows of x (2P, ...) once, then its P prompt rows n times: (P + nP, ...)."""
    return torch.cat([x[:P]] + [x[P:]] * n)


def add_to_output(layer, value: torch.Tensor) -> None:
    """Inside a trace: layer's output + value, moved to the output's device (models spread by device_map)."""
    out = layer.output
    layer.output = out + value.to(out.device)


def logit_diff(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """LD = logit[r] − logit[r'] in float32: logits (..., V), ids (..., 2) answer ids (r, r') -> (...)."""
    ld = logits.float().gather(-1, ids.to(logits.device))
    return ld[..., 0] - ld[..., 1]
