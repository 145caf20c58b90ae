"""Independent reference implementations with plain torch hooks (no nnsight), for the correctness tests."""
from __future__ import annotations

import contextlib

import torch

from modality_circuits.data.pairs import batch


def _modules(model):
    """[(attn_out module, mlp_out module)] per decoder layer of the plain transformers model."""
    return [(model.head_site(layer), model.neuron_site(layer)) for layer in model.layers(model.hf_model)]


@contextlib.contextmanager
def _pre_hooks(hooks):
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _experts(model) -> list:
    """The fused experts modules of the sparse layers (none in a dense model)."""
    return [m for m in map(model.experts_of, model.layers(model.hf_model)) if m is not None]


def held_routing(model, clean) -> list:
    """Pre-hooks that route every sparse layer as a plain forward on `clean` (inputs of one prompt) does."""
    if clean is None or not _experts(model):
        return []
    seen = []

    def grab(module, args):
        seen.append((args[1].clone(), args[2].detach().clone()))

    with _pre_hooks([(m, grab) for m in _experts(model)]), torch.no_grad():
        model.hf_model(**clean)
    return [(m, lambda module, args, r=r: (args[0], *r)) for m, r in zip(_experts(model), seen)]


def _rows(x, T):
    """A site input as (B, T, width): a sparse layer's expert neurons arrive as (B·T, E·I)."""
    return x.view(-1, T, x.shape[-1])


def activations(model, inputs, clean=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (head input (B,T,H*D), neuron input (B,T,I)) of one forward; clean: route sparse layers as it."""
    acts, T = [], inputs["input_ids"].shape[1]

    def grab(module, args):
        acts.append(_rows(args[0], T).detach().clone())

    mods = [m for pair in _modules(model) for m in pair]
    with _pre_hooks(held_routing(model, clean) + [(m, grab) for m in mods]), torch.no_grad():
        model.hf_model(**inputs)
    return [(acts[2 * i], acts[2 * i + 1]) for i in range(len(acts) // 2)]


def logit_diff(model, inputs, pair, hooks=()) -> torch.Tensor:
    with _pre_hooks(hooks), torch.no_grad():
        logits = model.hf_model(**inputs).logits[:, -1]
    return logits[:, pair.answer_id] - logits[:, pair.cf_answer_id]


def patch_node(model, pair, kind, layer, unit, pos) -> float:
    """LD(p with node := its p' value) − LD(p), by a pre-hook that overwrites the slice."""
    cf = activations(model, pair.cf_inputs, clean=pair.inputs)[layer][0 if kind == "head" else 1]
    d, T = model.layer_head_dims[layer], pair.length

    def hook(module, args):
        x = _rows(args[0], T).clone()
        sl = slice(unit * d, (unit + 1) * d) if kind == "head" else slice(unit, unit + 1)
        x[:, pos, sl] = cf[:, pos, sl]
        return (x.view(args[0].shape), *args[1:])

    module = _modules(model)[layer][0 if kind == "head" else 1]
    held = held_routing(model, pair.inputs)
    return float(logit_diff(model, pair.inputs, pair, held + [(module, hook)]) - logit_diff(model, pair.inputs, pair))


def ablate(model, pair, circuit) -> float:
    """LD(p) with every node outside `circuit` set to its p' value, hooks layer by layer."""
    cf = activations(model, pair.cf_inputs, clean=pair.inputs)
    hooks, T = held_routing(model, pair.inputs), pair.length
    for i, (attn, mlp) in enumerate(_modules(model)):
        H = model.layer_heads[i]  # the layer's own units: Scores pad narrower layers
        for module, keep, c in ((attn, circuit.heads[i][:H], cf[i][0]), (mlp, circuit.neurons[i], cf[i][1])):
            def hook(module, args, keep=keep, c=c, heads=module is attn, H=H):
                x = _rows(args[0], T).clone()
                k = keep.T[:, :x.shape[-1]]  # (T, units)
                if heads:
                    k = k.repeat_interleave(x.shape[-1] // H, dim=1)
                x[0][~k] = c[0][~k]
                return (x.view(args[0].shape), *args[1:])
            hooks.append((module, hook))
    return float(logit_diff(model, pair.inputs, pair, hooks))


def ig_scores(model, pair, steps, absolute=False, hold=None):
    """Step-at-a-time IG on the merged decoder input: heads (L,H,T), neurons (L,I,T) for one pair.

    absolute: |Δa · mean ∇| per element before summing a head's elements (the reference's head score).
    hold: None, or a (T,) bool mask of image positions set to p's merged input at every gradient step (the
    reference's "tokens" interpolation; injected features, which live at image positions only, are p's too).
    Δa always comes from separate forwards of p' and p."""
    layer0 = model.layers(model.hf_model)[0]
    stack, keys, token = model.decoder_stack(model.hf_model), model.adapter.injections, model.adapter.token_inputs
    merged = {}

    def grab(module, args):
        merged["x"] = args[0].detach().clone()

    def grab_injected(module, args, kwargs):  # DeepStack-style features, handed to the decoder stack as a keyword
        merged["g"] = [t.detach().clone() for t in kwargs[keys[0]]] if keys and kwargs.get(keys[0]) else None
        merged["q"] = kwargs[token].detach().clone() if token else None  # Gemma 4's per-layer token embeddings

    for name, inp in (("p", pair.inputs), ("cf", pair.cf_inputs)):
        handle = stack.register_forward_pre_hook(grab_injected, with_kwargs=True)
        with _pre_hooks([(layer0, grab)]), torch.no_grad():
            model.hf_model(**inp)
        handle.remove()
        merged[name], merged["g_" + name], merged["q_" + name] = merged.pop("x"), merged.pop("g"), merged.pop("q")
    a_p, a_cf = activations(model, pair.inputs), activations(model, pair.cf_inputs, clean=pair.inputs)
    mods, held, T = _modules(model), held_routing(model, pair.inputs), pair.length
    grads = [[0.0, 0.0] for _ in mods]
    for j in range(1, steps + 1):
        x = merged["cf"] + j / steps * (merged["p"] - merged["cf"])
        if hold is not None:
            x[:, hold] = merged["p"][:, hold]
        kept = []

        def keep(module, args):
            t = args[0]
            t.retain_grad()
            kept.append(t)

        def swap(module, args):
            return (x.clone().requires_grad_(True), *args[1:])

        def swap_injected(module, args, kwargs, alpha=j / steps):
            if merged["g_p"] is not None:
                a = 1.0 if hold is not None else alpha
                kwargs[keys[0]] = [c + a * (p - c) for p, c in zip(merged["g_p"], merged["g_cf"])]
            if token:  # the stack computes the per-layer inputs from its embeddings and the token input: both move
                q = merged["q_cf"] + alpha * (merged["q_p"] - merged["q_cf"])
                if hold is not None:
                    q[:, hold] = merged["q_p"][:, hold]
                kwargs["inputs_embeds"], kwargs[token] = x.clone(), q
            return args, kwargs

        handle = stack.register_forward_pre_hook(swap_injected, with_kwargs=True)
        hooks = [(layer0, swap)] + held + [(m, keep) for pair_ in mods for m in pair_]
        with _pre_hooks(hooks):
            logits = model.hf_model(**pair.inputs).logits[0, -1]
            (logits[pair.answer_id] - logits[pair.cf_answer_id]).backward()
        handle.remove()
        for i in range(len(mods)):
            grads[i][0] = grads[i][0] + _rows(kept[2 * i].grad, T) / steps
            grads[i][1] = grads[i][1] + _rows(kept[2 * i + 1].grad, T) / steps
    heads, neurons = [], []
    for i in range(len(mods)):
        sh, sn = ((a_cf[i][0] - a_p[i][0]) * grads[i][0])[0], ((a_cf[i][1] - a_p[i][1]) * grads[i][1])[0]
        if absolute:
            sh, sn = sh.abs(), sn.abs()
        sh = sh.view(sh.shape[0], model.layer_heads[i], -1).sum(-1).T
        heads.append(torch.nn.functional.pad(sh, (0, 0, 0, model.n_heads - len(sh))))  # zero rows: padding
        neurons.append(torch.nn.functional.pad(sn.T, (0, 0, 0, model.d_mlp - sn.shape[1])))
    return torch.stack(heads), torch.stack(neurons)


def batched(pairs):
    return batch([p.inputs for p in pairs])
