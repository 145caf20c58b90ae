"""Exact patching of node sets by plain torch pre-hooks (independent of the package's nnsight code)."""
from __future__ import annotations

import contextlib

import torch
from hooks import _modules, activations


def patched_effects(model, pair, heads: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """(R,) LD(p with the nodes of row r := their p' values) − LD(p); heads (R, L, H, T), neurons (R, L, I, T)."""
    cf = activations(model, pair.cf_inputs)
    R, H = heads.shape[0], model.n_heads
    ids = torch.tensor([pair.answer_id, pair.cf_answer_id])
    with torch.no_grad():
        base = model.hf_model(**pair.inputs).logits[0, -1, ids]
    hooks = []
    for layer, (attn, mlp) in enumerate(_modules(model)):
        for module, mask, c, is_head in ((attn, heads[:, layer], cf[layer][0], True),
                                         (mlp, neurons[:, layer], cf[layer][1], False)):
            def hook(module, args, mask=mask, c=c, is_head=is_head):
                x = args[0]
                m = mask.transpose(1, 2)  # (R, T, units)
                if is_head:
                    m = m.repeat_interleave(x.shape[-1] // H, dim=2)
                return (torch.where(m, c.expand_as(x), x), *args[1:])
            hooks.append(module.register_forward_pre_hook(hook))
    inputs = {k: torch.cat([v] * R) if torch.is_tensor(v) else v for k, v in pair.inputs.items()}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for h in hooks:
            stack.callback(h.remove)
        logits = model.hf_model(**inputs).logits[:, -1][:, ids]
    return (logits[:, 0] - logits[:, 1]) - (base[0] - base[1])


def single_node_masks(model, length: int, nodes: list[tuple[str, int, int, int]]):
    """Masks that patch one node a row: nodes [("head" | "neuron", layer, unit, position)]."""
    heads = torch.zeros(len(nodes), model.n_layers, model.n_heads, length, dtype=torch.bool)
    neurons = torch.zeros(len(nodes), model.n_layers, model.d_mlp, length, dtype=torch.bool)
    for r, (kind, layer, unit, pos) in enumerate(nodes):
        (heads if kind == "head" else neurons)[r, layer, unit, pos] = True
    return heads, neurons
