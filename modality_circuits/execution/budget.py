"""How many rows a forward may hold: the memory budget every method's chunking reads.

`VLM.memory_budget` is bytes, a string such as "40GB", or "auto": a safe share of what is free
now (CUDA: 80 % of the free device memory; CPU: 50 % of MemAvailable, the machine being shared).
`rows(model, length, backward=...)` divides it by a modelled per-row cost and caps the result at the
canonical chunk (`canonical_rows`: on a GPU what fits the card's total memory, on the CPU `CANONICAL_TOKENS`)
and at the method's `max_rows` (default: no cap); every method passes it to `requests.chunked`. The canonical
cap makes a chunk's composition, and with it the last float bits of a BLAS kernel's sums, independent of the
memory free now: any budget that holds a canonical chunk gives the same chunks. A budget or `max_rows` below it
gives smaller chunks, noted in `REDUCED` (the study writes the notes into its records) and warned
(docs/reproducibility.md).

The per-row model (b bytes per element of the model's dtype; d hidden size, I MLP width, H heads,
L layers, T tokens, V vocabulary):
  forward:  T·(8d + 10I)·b + 2·H·T²·b + 4V + 18·T′·W·4
            one layer's live activations, the site inputs an intervention holds, attention scores, fp32 last logits
  backward: L·T·(18d + 12I)·b + L·H·T²·b + L_lin·16·T′·W·4 + forward
            what autograd keeps for every layer, and the site inputs and their gradients the attribution reads
Linear-attention layers (L_lin of them, the layer types of `Adapter.layer_heads`: Qwen3.5's Gated DeltaNet; W = 0
without them) run transformers' chunked recurrence in float32 on the sequence padded to T′ (a multiple of LINEAR_CHUNK), with W =
value heads × value-head width: its copies of queries, keys, values, their β-scaled and decayed forms, the chunk
matrices and the output are about 18 such (T′, W) float32 tensors live in a forward and 16 kept per layer for the
backward (measured on one Qwen3.5-27B layer in bfloat16, docs/families-2026.md).
experiments/bench_scale.py compares it with measured peaks (docs/scale.md); docs/method.md section 10 quotes it.
"""
from __future__ import annotations

import re
import warnings

import torch

#: Share of the free memory "auto" uses (the rest absorbs allocator fragmentation and the model's own
#: buffers); on the CPU, other processes share the RAM.
SAFE_SHARE = {"cuda": 0.8, "cpu": 0.5}
_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
#: transformers' chunk length of the gated delta rule (`torch_chunk_gated_delta_rule`): the sequence is padded to it.
LINEAR_CHUNK = 64
#: (T', W) float32 tensors of a linear-attention layer live in a forward, and kept per layer for a backward.
LINEAR_LIVE, LINEAR_KEPT = 18, 16


def parse(budget) -> int | str:
    """A budget as bytes (int) or "auto"; accepts numbers and strings like "40GB", "512 MB"."""
    if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
        return "auto"
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0:
        return int(budget)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(budget).upper())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"memory budget must be 'auto', a positive number of bytes or e.g. '40GB'; got {budget!r}")
    unit = match.group(2) if match.group(2).endswith("B") or not match.group(2) else match.group(2) + "B"
    return int(float(match.group(1)) * _UNITS[unit])


def free_bytes(device: torch.device) -> int:
    """Memory free for activations now: free CUDA memory, or MemAvailable of the machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: assume 8 GiB
        return 8 * 2**30


def resolve(budget, device: torch.device) -> int:
    """The budget in bytes ("auto": SAFE_SHARE of what is free on `device` now)."""
    budget = parse(budget)
    share = SAFE_SHARE.get(device.type, SAFE_SHARE["cpu"])
    return int(share * free_bytes(device)) if budget == "auto" else budget


def row_bytes(model, length: int, *, backward: bool = False) -> int:
    """Modelled peak bytes of one row of `length` tokens (see the module docstring)."""
    tc = model.text_config
    b = torch.finfo(model.dtype).bits // 8
    d, i, h, layers, t = tc.hidden_size, model.d_mlp, model.n_heads, model.n_layers, length
    types = getattr(tc, "layer_types", None) or ()
    recurrent = {kind for kind, *_ in model.adapter.layer_heads}  # the adapter's non-attention layer types
    linear = [k for k, kind in enumerate(types) if kind in recurrent]  # Qwen3.5's Gated DeltaNet layers
    chunked = -(-t // LINEAR_CHUNK) * LINEAR_CHUNK * max((model.layer_heads[k] * model.layer_head_dims[k]
                                                          for k in linear), default=0) * 4  # one (T', W) fp32 tensor
    forward = t * (8 * d + 10 * i) * b + 2 * h * t * t * b + 4 * tc.vocab_size + LINEAR_LIVE * chunked
    if not backward:
        return forward
    return layers * (t * (18 * d + 12 * i) * b + h * t * t * b) + len(linear) * LINEAR_KEPT * chunked + forward


#: Token rows (rows × tokens) of one canonical chunk on the CPU, a forward or a forward+backward: fixed, so the
#: same on every machine; the toy runs fastest near these sizes (docs/reproducibility.md).
CANONICAL_TOKENS = {"forward": 8192, "backward": 2048}

#: Notes of chunks made smaller than canonical since the last `REDUCED.clear()`.
REDUCED: set[str] = set()


def canonical_rows(model, length: int, *, backward: bool = False, extra: int = 0) -> int:
    """Rows of `length` tokens in a canonical chunk (at least 1), never derived from the memory free now: on a CUDA
    device, what fits SAFE_SHARE of the card's total memory less the weights (a property of the card: what "auto"
    gives on an otherwise idle card); for a model on a server, what fits the budget given in bytes (the server's
    memory, as stated); else CANONICAL_TOKENS."""
    device, stated = model.device, parse(model.memory_budget)
    if device.type == "cuda":
        weights = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
        room = SAFE_SHARE["cuda"] * (torch.cuda.get_device_properties(device).total_memory - weights)  # "auto" on an idle card
        return max(1, int(room // (row_bytes(model, length, backward=backward) + extra)))
    if model.hosted and stated != "auto":
        return max(1, stated // (row_bytes(model, length, backward=backward) + extra))
    return max(1, CANONICAL_TOKENS["backward" if backward else "forward"] // length)


def rows(model, length: int, *, backward: bool = False, max_rows: int | None = None, extra: int = 0) -> int:
    """Rows of `length` tokens per chunk: the canonical chunk, or fewer where the model's memory budget or
    `max_rows` holds fewer (noted in REDUCED and warned); at least 1. `extra`: bytes a row holds besides
    its forward (e.g. cached residuals)."""
    canonical = canonical_rows(model, length, backward=backward, extra=extra)
    fit = resolve(model.memory_budget, model.device) // (row_bytes(model, length, backward=backward) + extra)
    size = max(1, min(canonical, fit, max_rows or canonical))
    if size < canonical:
        why = "max_rows" if max_rows and max_rows < min(canonical, fit) else "the memory budget"
        note = (f"{'forward+backward' if backward else 'forward'} chunks of {size} rows of {length} tokens (canonical "
                f"{canonical}), set by {why}")
        warnings.warn(f"{note}: numbers may differ from a canonical run in the last float bits "
                      "(docs/reproducibility.md)", stacklevel=2)  # shown once per message and caller
        REDUCED.add(note)
    return size
