"""A module whose INPUT is the expert neurons of a fused mixture-of-experts layer (docs/families-2026.md).

transformers stores a sparse layer's experts fused (`gate_up_proj` (E, 2I, d), `down_proj` (E, d, I)), so an
expert's neurons are not the input of any module. `install_neuron_sites` gives each experts module a child
`neurons` (a plain `torch.nn.Identity`) and an eager forward that passes the (tokens, E·I) neuron tensor
through it: unit e·I + j is unit j of expert e's act(gate)·up, zero at tokens not routed to e, and an always-on
MLP's neurons follow at E·I + j (every token): GLM-4.6V's shared expert (`sited_block_forward`), or Gemma 4's dense
MLP beside its layer-level experts (`sited_parallel_mlp_forward`). The numbers
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


def sited_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  dense: torch.Tensor | None = None):
    """hidden (N, d), top_k_index and top_k_weights (N, K) -> (N, d); neurons (N, E·I (+ I_s)) go through `self.neurons`.

    Only routed tokens are computed, expert by expert (the eager implementation's loop). The units after E·I are an
    always-on MLP's: GLM's shared expert (computed here, its output added), or the neurons `dense` (N, I_s) of a dense
    MLP beside the experts (Gemma 4: `sited_parallel_mlp_forward`), then (output, dense neurons after the site) is
    returned."""
    n_experts, transposed = self.num_experts, getattr(self, "is_transposed", False)
    width = self.down_proj.shape[1] if transposed else self.down_proj.shape[-1]
    hit = [int(e) for e in torch.unique(top_k_index) if int(e) < n_experts]  # EP sentinels (== E) skipped
    routed = [torch.where(top_k_index == e) for e in hit]  # (tokens, slot) per hit expert
    acts = hidden_states.new_zeros(hidden_states.shape[0], n_experts, width)
    for e, (tokens, _) in zip(hit, routed):
        gate_up = _linear(hidden_states[tokens], self.gate_up_proj[e], transposed)
        column = torch.full_like(tokens, e)
        acts = acts.index_put((tokens, column), self._apply_gate(gate_up))  # out of place: gradients flow
    shared = self.__dict__.get("_shared")  # GLM's shared expert: every token, its neurons after the routed ones
    always = dense if shared is None else shared.act_fn(shared.gate_proj(hidden_states)) * shared.up_proj(hidden_states)
    out = torch.zeros_like(hidden_states)
    if always is None:
        acts = getattr(self, SITE)(acts.flatten(1)).view(acts.shape)
    else:
        both = getattr(self, SITE)(torch.cat([acts.flatten(1), always.to(acts.dtype)], dim=1))
        acts, always = both[:, :acts[0].numel()].view(acts.shape), both[:, acts[0].numel():]
        if shared is not None:
            out = shared.down_proj(always)
    for e, (tokens, slot) in zip(hit, routed):
        y = _linear(acts[tokens, e], self.down_proj[e], transposed) * top_k_weights[tokens, slot, None]
        out = out.index_add(0, tokens, y.to(out.dtype))
    return out if dense is None else (out, always)


def sited_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A sparse block with a shared expert (GLM-4.6V): the experts module computes the shared expert too, so that
    one site holds both (the block's own forward adds shared_experts(hidden) after the routed experts)."""
    shape = hidden_states.shape
    _, top_k_weights, top_k_index = self.gate(hidden_states)
    return self.experts(hidden_states.view(-1, shape[-1]), top_k_index, top_k_weights).view(shape)


def sited_parallel_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A sparse Gemma 4 layer's feed-forward part, as the dense MLP `self` of a layer whose `enable_moe_block` is off:
    x (batch, T, d) = pre_feedforward_layernorm(residual) -> the sum of the two normed branches (batch, T, d).

    The dense MLP's neurons go into the experts' call (`dense`), so that they pass through the experts' site after
    the routed ones; the router and the experts read the residual stream, which the layer's pre-feedforward norm
    handed over (`_keep_residual`). Computes what transformers' sparse layer computes (tests/test_families_2026.py)."""
    layer, residual = self.__dict__["_layer"], self.__dict__.pop("_residual")
    flat = residual.reshape(-1, residual.shape[-1])
    _, top_k_weights, top_k_index = layer.router(flat)
    act = (self.act_fn(self.gate_proj(x)) * self.up_proj(x)).reshape(len(flat), -1)
    routed, act = layer.experts(layer.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights, dense=act)
    dense = layer.post_feedforward_layernorm_1(self.down_proj(act).reshape(x.shape))
    return dense + layer.post_feedforward_layernorm_2(routed.reshape(residual.shape))


def _keep_residual(self, residual: torch.Tensor) -> torch.Tensor:
    """A Gemma 4 sparse layer's pre-feedforward norm that hands its input, the residual stream, to the dense MLP's
    sited forward (called right after it)."""
    self.__dict__["_mlp"].__dict__["_residual"] = residual
    return type(self).forward(self, residual)


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
    block_path = path.rsplit(".", 1)[0] if "." in path else None
    for layer in layers:
        module = experts_at(layer, path)
        if module is None or hasattr(module, SITE):
            continue
        check_experts(module)
        module.add_module(SITE, torch.nn.Identity())
        module.forward = types.MethodType(sited_forward, module)
        block = layer.get_submodule(block_path) if block_path else layer
        if hasattr(block, "shared_experts"):  # not a child of the experts: the module tree stays the model's
            module.__dict__["_shared"] = block.shared_experts
            block.forward = types.MethodType(sited_block_forward, block)
        elif block is layer and hasattr(layer, "mlp"):  # Gemma 4: a dense MLP beside layer-level experts
            module.__dict__["_dense"], layer.mlp.__dict__["_layer"] = layer.mlp, layer
            layer.pre_feedforward_layernorm.__dict__["_mlp"] = layer.mlp
            layer.pre_feedforward_layernorm.forward = types.MethodType(_keep_residual, layer.pre_feedforward_layernorm)
            layer.mlp.forward = types.MethodType(sited_parallel_mlp_forward, layer.mlp)
            layer.enable_moe_block = False  # the layer's own sparse branch is the dense MLP's sited forward now


def n_neurons(module) -> int:
    """E·I (+ the shared expert's or the dense MLP's neurons): the width of an experts module's neuron site."""
    transposed = getattr(module, "is_transposed", False)
    always = module.__dict__.get("_shared", module.__dict__.get("_dense"))  # GLM's shared expert, Gemma 4's dense MLP
    return (module.num_experts * (module.down_proj.shape[1] if transposed else module.down_proj.shape[-1])
            + (always.down_proj.in_features if always is not None else 0))
