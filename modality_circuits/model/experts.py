"""A module whose INPUT is the expert neurons of a fused mixture-of-experts layer (docs/families-2026.md).

transformers stores a sparse layer's experts fused (`gate_up_proj` (E, 2I, d), `down_proj` (E, d, I)), so an
expert's neurons are not the input of any module. `install_neuron_sites` gives each experts module a child
`neurons` (a plain `torch.nn.Identity`) and an eager forward that passes the (tokens, E·I) neuron tensor
through it: unit e·I + j is unit j of expert e's act(gate)·up, zero at tokens not routed to e. The numbers
are the eager implementation's; the site is read, written and differentiated like any other module input,
here and in the serialisation dry run (remote="local"). A hosted server has its own copy of the model,
without the site: `VLM.with_remote` refuses hosted MoE models.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

#: The child module of an experts module whose input is its neurons.
SITE = "neurons"


def _linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ weight if transposed else F.linear(x, weight)


def sited_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """hidden (N, d), top_k_index and top_k_weights (N, K) -> (N, d); neurons (N, E·I) go through `self.neurons`.

    Only routed tokens are computed, expert by expert (the eager implementation's loop)."""
    n_experts, transposed = self.num_experts, getattr(self, "is_transposed", False)
    width = self.down_proj.shape[1] if transposed else self.down_proj.shape[-1]
    hit = [int(e) for e in torch.unique(top_k_index) if int(e) < n_experts]  # EP sentinels (== E) skipped
    routed = [torch.where(top_k_index == e) for e in hit]  # (tokens, slot) per hit expert
    acts = hidden_states.new_zeros(hidden_states.shape[0], n_experts, width)
    for e, (tokens, _) in zip(hit, routed):
        gate_up = _linear(hidden_states[tokens], self.gate_up_proj[e], transposed)
        column = torch.full_like(tokens, e)
        acts = acts.index_put((tokens, column), self._apply_gate(gate_up))  # out of place: gradients flow
    acts = getattr(self, SITE)(acts.flatten(1)).view(acts.shape)
    out = torch.zeros_like(hidden_states)
    for e, (tokens, slot) in zip(hit, routed):
        y = _linear(acts[tokens, e], self.down_proj[e], transposed) * top_k_weights[tokens, slot, None]
        out = out.index_add(0, tokens, y.to(out.dtype))
    return out


def check_experts(module) -> None:
    """Refuse an experts module whose layout the sited forward does not reproduce (biases, ungated, post norm)."""
    for flag, why in (("has_bias", "expert biases"), ("has_post_expert_norm", "a norm after each expert")):
        if getattr(module, flag, False):
            raise ValueError(f"{type(module).__name__} has {why}: its expert neurons have no site (docs/families-2026.md)")
    if not getattr(module, "has_gate", True) or not hasattr(module, "gate_up_proj") or not hasattr(module, "_apply_gate"):
        raise ValueError(f"{type(module).__name__} is not a gated fused experts module (gate_up_proj, down_proj)")


def experts_at(layer, path: str | None):
    """The fused experts module at `path` of a decoder layer (torch module or nnsight envoy), or None (a dense layer)."""
    module = layer
    for name in (path or "").split(".") if path else ():
        if not hasattr(module, name):
            return None
        module = getattr(module, name)
    return module if path and hasattr(module, "gate_up_proj") else None


def install_neuron_sites(layers, path: str) -> None:
    """Give the fused experts module of every sparse layer the `neurons` site and the sited forward (idempotent).

    Call before nnsight wraps the model: its hooks wrap each module's forward as it finds it."""
    for module in filter(None, (experts_at(layer, path) for layer in layers)):
        check_experts(module)
        if not hasattr(module, SITE):
            module.add_module(SITE, torch.nn.Identity())
            module.forward = types.MethodType(sited_forward, module)


def n_neurons(module) -> int:
    """E·I: the width of an experts module's neuron site."""
    transposed = getattr(module, "is_transposed", False)
    return module.num_experts * (module.down_proj.shape[1] if transposed else module.down_proj.shape[-1])
