"""The pieces every server body shares, written once. THIS CODE RUNS ON AN NDIF SERVER.

The `@server_body` functions (execution/remote.py) call these inside their trace blocks. A server does
not have this package, so this module is shipped with every request by value: execution/remote.py
registers it with `nnsight.register` (cloudpickle's `register_pickle_by_value`, which nnsight's
serialiser honours), and each function travels as its source. Hence the rule for this file: torch,
builtins and envoys only, no import of this package, no module-level state.
"""
from __future__ import annotations

import torch


def decoder_inputs(layers, stack, keys: tuple, inject: bool, dtype=None, token_key=None):
    """Inside an embedding trace: (e, g, q) where e is the decoder input (rows, T, d), g (n, rows, T, d) the visual
    features added after the first n layers at the image positions (zero elsewhere), or None without injections,
    and q the decoder stack's per-token input `token_key` (rows, T, ...) (`Adapter.token_inputs`), or None.

    e and q are copies in the model's dtype, or cast to `dtype` (e.g. float32); g has e's dtype and device. The
    features and q are read from the decoder stack's keyword inputs (`keys` = (features, image-position mask)),
    before layer 0 runs.
    """
    if inject or token_key:
        kwargs = stack.inputs[1]
    if inject:  # docs/method.md section 13
        feats, where = torch.stack(kwargs[keys[0]]), kwargs[keys[1]]
    q = None
    if token_key:
        q = kwargs[token_key].clone() if dtype is None else kwargs[token_key].to(dtype)
    e = layers[0].input.clone() if dtype is None else layers[0].input.to(dtype)
    if not inject:
        return e, None, q
    g = e.new_zeros(len(feats), *e.shape)
    g[:, where.to(e.device)] = feats.to(e.device, e.dtype)
    return e, g, q


def embed_pass(root, inputs: dict, opts: dict, layers, stack, keys: tuple, inject: bool, dtype=None, moe=None,
               token_key=None):
    """In a session: one trace of `inputs` (p' rows, then p rows) stopped at decoder layer 0, giving
    `decoder_inputs`' (e, g, q) (the vision tower runs here, once per prompt; every later row starts from e).

    moe: per layer its experts' envoy (None for a dense layer). With a sparse layer the trace runs to the end and
    (e, g, q, held) is returned, held[i] = the p rows' routing at layer i, ((P·T, k) indices, weights) or None:
    every later row is routed as its prompt p (docs/families-2026.md)."""
    sparse = moe is not None and any(m is not None for m in moe)
    held = [None] * len(layers)
    with root.trace(**inputs, **opts) as embed:
        e, g, q = decoder_inputs(layers, stack, keys, inject, dtype, token_key)
        for i in range(len(layers) if sparse else 0):
            if moe[i] is not None:
                (_, top, w), _ = moe[i].inputs
                half = top.shape[0] // 2  # the p rows' tokens
                held[i] = (top[half:].clone(), w[half:].detach().clone())
        if not sparse:
            embed.stop()
    return (e, g, q) if moe is None else (e, g, q, held)


def rerun_from(model, inputs: dict, vision: tuple) -> tuple:
    """(decoder-only inputs, decoder stack, injected features' keys, whether `inputs` inject features, per-token input
    key): what a body that reruns the decoder from merged inputs reads of `model`, before its session (its trace
    blocks run on a server, where they cannot read the adapter)."""
    decoder = {key: value for key, value in inputs.items() if key not in vision}
    return decoder, model.decoder_stack(), model.adapter.injections, model.injects(inputs), model.adapter.token_inputs


def feed_stack(stack, e: torch.Tensor, token_key, q) -> None:
    """Inside a trace whose decoder starts from given inputs: with a per-token input (`Adapter.token_inputs`, q its
    rows (rows, T, ...)) the decoder stack reads e (rows, T, d) as its inputs_embeds and q as `token_key`, from which
    it computes what each layer reads beside the residual stream (Gemma 4's per-layer inputs). No-op without one.
    Call before layer 0's input is written (execution order)."""
    if token_key:
        args, kwargs = stack.inputs
        stack.inputs = (args, {**kwargs, "inputs_embeds": e.to(kwargs["inputs_embeds"].device),
                               token_key: q.to(kwargs["inputs_embeds"].device)})


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
