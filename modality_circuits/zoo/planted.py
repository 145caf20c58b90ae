"""A model organism: a small LLaVA whose task circuits are known exactly, by construction (docs/validation.md).

`organism(seed)` compiles a LlavaForConditionalGeneration (CLIP vision tower + Llama decoder, the toy's
tokenizer, processor and wording) by hand for counting, colour ordering and sentiment, and returns it with its
ground truth: the (layer, unit, position) nodes whose counterfactual patching changes the metric.

How the truth is exact: every head and neuron outside the planted roles keeps random query/key/value
and gate/up weights (it is active, its activation varies with the input) but writes nothing (its o_proj
or down_proj input columns are zero), so patching it changes nothing. Planted heads attend hard (score
margins of hundreds, so the other softmax weights are exactly 0 in float32) and default to the BOS token,
whose value is zero; planted neurons are gated by the tokens of the positions they serve. A planted unit
therefore matters only at the positions where it carries data that differs between p and p′ and that a
later planted unit reads; those positions are the truth.

The circuit of each task (D: data, Q: query, G: generation span; every stage is one head and two neurons):
  text D   layer 0: a self-attending head copies each data word's code (its colour, an object's canonical
           colour, an event's sentiment) to a pre-code, two neurons write it as a 2-d code;
  image D  layers 0..T: the same stage repeated T + 1 times on the image tokens' own features (patch colour, or
           icon quarter sentiment, from the vision tower), the last writing the text code: image tokens become
           text-like at layer T;
  Q        at "?": a gathering head (counting: the tokens whose code matches the queried object plus a BOS
           sink weighing SINK_WEIGHT, so its output is c / (c + 20), written AMP_COUNT times, and a raw count of
           the same kind on the tokens' raw data, shared by the modalities, written AMP_COUNT - 1 times
           negatively by two relay neurons, so a D node patched alone moves the count AMP_COUNT times as far;
           colour ordering: the k-th colour word or row-1 patch from the
           left or right, a rotary position lookup; sentiment: the event word, or the icon quarters, averaged);
           the early gathers read layer 1, the late gathers of the image route layer T + 1, each route into
           its own dims; per kind two relay neurons at layer T + 1, one reading both routes' dims (shared by
           the modalities), one its route's. A gather
           reads AMP x its target's code minus (AMP - 1) x the code of its raw data, so a data position's
           nodes patched alone move the answer AMP times as far (`code_ov`);
  G        a relay head and two neurons at "ASSISTANT", then at ":"; the unembedding reads the result.
Planted findings (`control=True` or `separate_data=False`: none): image D units differ from text D units
(overlap, interchange; Q gathers differ, Q relays are shared), image tokens become text-like only at layer T
(alignment), the image circuit has
more nodes per position (size), and the late colour route only serves "from the left" questions, so
back-patching image tokens from layer >= T into layer 0 lets the early route answer the rest.
Only the vision front end's patch classifier is fitted (patch -> fill colour or sentiment). Counting questions
about "fish" (whose plural is the data word itself) are answered wrongly by design; the study keeps correct pairs only.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

#: The organism's tasks (built-in tasks, toy wording).
TASKS = ("counting", "color_ordering", "sentiment")
MODALITIES = ("text", "image")
COLOURS8 = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "gray")
SENTIMENTS = ("happy", "sad", "neutral")
#: a sentiment's code angle: halfway between two colours' (so a colour word never ties with a sentiment word)
SENTIMENT_ANGLE = {s: math.pi / 8 * (1 + 6 * i) for i, s in enumerate(SENTIMENTS)}
ICON_QUARTERS = (0, 1, 2)  # the scene icon's quarters (row-major in its 2x2 cells) that carry its sentiment
AMP = 3.0  # a gather reads its target's code AMP times and the target's raw data AMP - 1 times negatively
AMP_COUNT = 8.0  # the count is read from the codes AMP_COUNT times, from the raw data AMP_COUNT - 1 times negatively
SINK_WEIGHT = 20.0  # a count gather's BOS weighs this many matches: its output c / (c + 20) is nearly linear in c
LAYERS, HEADS, HEAD_DIM, NEURONS, HIDDEN = 6, 6, 64, 12, 384
ROPE_THETA = 1e6
NORM = 100.0  # every token carries NORM on its modality's norm dimension: the residual norm is ~constant
SINK = 500.0  # score of the BOS token (zero value) in every planted head
LOOKUP = 4000.0  # score of a colour gather's target (neighbours >= 1300 below)
SELF = 2000.0  # scale of the self-attending heads' score (peak 3 * SELF, other positions <= 2.51 * SELF)
_PAIR_SINK, _PAIR_MATCH, _PAIR_TOKEN, _PAIR_CLASS = 31, 30, 29, 28  # rotary pairs of ~zero frequency: position-free
_PAIR_TEXT, _PAIR_IMAGE = 2, 0  # rotary pairs of the colour lookups (colour words 2 tokens apart, patches 1)
_SELF_PAIRS = (0, 2, 4)  # frequencies 1, 0.42, 0.18
# text D: colour words at D offsets 0, 2, 4, 6 ("?" is 19 - 2 i tokens later); image: row-1 patches at D
# offsets 4..7 ("?" is 23 - i tokens later); counting: the seven words or the first seven patches
_TEXT_OFFSETS = [19 - 2 * i for i in range(4)]
_ICON_CELLS, _PERSON_CELLS = (6, 7, 10, 11), (4, 5, 8, 9)  # a scene's icon and person (render.scene)
_IMAGE_OFFSETS = [23 - i for i in range(4)]


@dataclass
class Truth:
    """Planted nodes: nodes[task][modality] = {"heads": [(layer, head, position)], "neurons": [(layer, neuron,
    position)]}, positions in the layout of the organism's pairs (`build_pairs`, toy wording); `roles` names
    every planted unit ("L1.H3": "count gather (early)"); `findings`: which findings are planted, per task."""

    nodes: dict
    roles: dict
    findings: dict
    settings: dict = field(default_factory=dict)

    def masks(self, task: str, modality: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (L, H, T) and (L, I, T) masks of the planted nodes."""
        heads = torch.zeros(LAYERS, HEADS, length, dtype=torch.bool)
        neurons = torch.zeros(LAYERS, NEURONS, length, dtype=torch.bool)
        for mask, kind in ((heads, "heads"), (neurons, "neurons")):
            for layer, unit, pos in self.nodes[task][modality][kind]:
                mask[layer, unit, pos] = True
        return heads, neurons


def check_seed(seed) -> int:
    """The seed as an int; TypeError for anything that is not an integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def organism(seed: int = 0, control: bool = False, *, separate_data: bool = True, translate_layer: int = 2,
             weak_late_route: bool = True):
    """(VLM, Truth): the compiled organism of `seed` and its planted circuits (module docstring).

    separate_data: image tokens have their own D units (False: the projector writes the text embedding of the
    patch's colour word and the text units serve both modalities; then no finding is planted);
    translate_layer (0, 1, 2): image tokens carry the text code from this layer's output on (image D has
    translate_layer + 1 stages); weak_late_route: the late colour route answers only "from the left".
    control=True: separate_data=False, same sizes.
    """
    seed = check_seed(seed)
    if translate_layer not in (0, 1, 2):
        raise ValueError(f"translate_layer must be 0, 1 or 2, got {translate_layer!r}")
    if control:
        separate_data = False
    from ..model.vlm import wrap
    from .toy import build_toy

    model, processor = build_toy(seed, hidden=HIDDEN, layers=LAYERS, heads=HEADS, intermediate=NEURONS,
                                 vision_hidden=16, vision_layers=1, vision_heads=2, vision_intermediate=16,
                                 rope_theta=ROPE_THETA)
    for cfg in (model.config, model.config.text_config):
        cfg.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.model.language_model.embed_tokens.weight))
    c = _Compiler(model, processor, random.Random(seed), separate_data, translate_layer, weak_late_route)
    with torch.no_grad():
        c.build()
    name = f"organism-{seed}" + ("-control" if control else "")
    vlm = wrap(model, processor, name=name, image_size=64, wording="toy")
    with torch.no_grad():
        c.calibrate(vlm)
    settings = {"seed": seed, "control": bool(control), "separate_data": separate_data,
                "translate_layer": translate_layer, "weak_late_route": weak_late_route}
    return vlm, c.truth(settings)


def _angle(colour: str) -> float:
    return 2 * math.pi * COLOURS8.index(colour) / len(COLOURS8)


def _circle(a: float) -> list[float]:
    return [math.cos(a), math.sin(a)]


def _rot(a: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


class _Compiler:
    """Writes the organism's weights in place (embeddings, vision tower, projector, decoder, unembedding).

    Every RMSNorm weight is 1/sqrt(HIDDEN), so a unit reads x̂ = h / |h|; |h| is NORM (100) at a plain token and
    NORM * sqrt(2) at a token carrying the 100-long colour code, and each read below divides by the x̂ it expects."""

    def __init__(self, model, processor, rng, separate_data, translate_layer, weak_late_route):
        from ..data import render, tasks

        self.m, self.proc, self.tok = model, processor, processor.tokenizer
        self.sep, self.T, self.weak = separate_data, translate_layer, weak_late_route
        V = model.config.text_config.vocab_size
        self.dims, nxt = {}, V
        for name, size in (("NORM_T", 1), ("NORM_I", 1), ("BOSD", 1), ("CFLAG", 1), ("OFLAG", 1), ("IFLAG", 1),
                           ("SFLAG", 1), ("QINFO", 1), ("PRE", 2), ("CODE", 2), ("QOBJ", 2), ("ORD", 4), ("SIDE", 2),
                           ("GX", 1), ("GCL", 2), ("GCR", 2), ("GS", 2), ("GXI", 1), ("GCLI", 2), ("GCRI", 2),
                           ("GSI", 2), ("GXR", 1), ("QX", 1), ("QC", 2), ("RAW", 8), ("RAWS", 3),
                           ("IPRE0", 2), ("ICODE0", 2), ("IPRE1", 2), ("ICODE1", 2), ("IPRE2", 2),
                           ("G0", 3), ("G0P", 3), ("G1", 3), ("FIN", 3)):
            self.dims[name] = list(range(nxt, nxt + size))
            nxt += size
        assert nxt <= HIDDEN, nxt
        # data words and the colour each stands for (brown and gray are no words of the toy vocabulary)
        self.colour_of = {**render.OBJECT_COLOURS, **{c: c for c in COLOURS8[:6]}}
        self.object_of = {c: o for o, c in render.OBJECT_COLOURS.items()}
        self.sentiment_of = {e: v[0] for e, v in tasks.EVENTS.items()}
        self.event_of = {v: next(e for e in tasks.EVENTS if self.sentiment_of[e] == v) for v in SENTIMENTS}
        # the code angle of every data word (colour words, objects: their colour; events: their sentiment)
        self.angle_of = {**{w: _angle(c) for w, c in self.colour_of.items()},
                         **{e: SENTIMENT_ANGLE[v] for e, v in self.sentiment_of.items()}}
        # image token classes: 8 fill colours, then 3 sentiments; their angles and, without separate data, the word
        self.class_angle = [_angle(c) for c in COLOURS8] + [SENTIMENT_ANGLE[v] for v in SENTIMENTS]
        self.class_word = [self.object_of[c] for c in COLOURS8] + [self.event_of[v] for v in SENTIMENTS]
        self.plurals = tasks.PLURALS
        self.ordinals, self.sides = tasks.ORDINALS, tasks.SIDES
        self.order_h = [rng.sample(range(HEADS), HEADS) for _ in range(LAYERS)]  # which index gets which role
        self.order_n = [rng.sample(range(NEURONS), NEURONS) for _ in range(LAYERS)]
        self.used_h, self.used_n = [0] * LAYERS, [0] * LAYERS
        self.roles: dict[str, str] = {}
        self.units: dict[str, tuple] = {}  # role group -> ((layer, head), [(layer, neuron), ...])
        self.count_out: dict[str, tuple] = {}  # count gather -> (its output dim, its gain)
        self.rng = rng

    def id(self, word: str) -> int:
        return self.tok.convert_tokens_to_ids(word)

    def d(self, name: str, i: int = 0) -> int:
        return self.dims[name][i]

    def layers(self):
        return self.m.model.language_model.layers

    # ------------------------------------------------------------------ allocation
    def head(self, layer: int, role: str) -> int:
        h = self.order_h[layer][self.used_h[layer]]
        self.used_h[layer] += 1
        self.roles[f"L{layer}.H{h}"] = role
        attn = self.layers()[layer].self_attn
        sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[sl] = 0.0
        return h

    def neuron(self, layer: int, role: str) -> int:
        n = self.order_n[layer][self.used_n[layer]]
        self.used_n[layer] += 1
        self.roles[f"L{layer}.N{n}"] = role
        mlp = self.layers()[layer].mlp
        mlp.gate_proj.weight[n] = 0.0
        mlp.up_proj.weight[n] = 0.0
        return n

    # ------------------------------------------------------------------ primitives
    def qk(self, layer, h, which, pair, dim, vec) -> None:
        """Add vec (2,) * x̂[dim] to head h's query or key in rotary pair `pair` (1/sqrt(head_dim) undone)."""
        attn = self.layers()[layer].self_attn
        W = attn.q_proj.weight if which == "q" else attn.k_proj.weight
        s = HEAD_DIM ** 0.25
        W[h * HEAD_DIM + pair, dim] += float(vec[0]) * s
        W[h * HEAD_DIM + pair + HEAD_DIM // 2, dim] += float(vec[1]) * s

    def score(self, layer, h, pair, qdim, kdim, target, xq, xk) -> None:
        """Query x̂[qdim] against key x̂[kdim] scores `target` when they read xq and xk (position-free pair)."""
        a = math.sqrt(target / (xq * xk))
        self.qk(layer, h, "q", pair, qdim, (a, 0.0))
        self.qk(layer, h, "k", pair, kdim, (a, 0.0))

    def sink(self, layer, h) -> None:
        """Default: BOS (whose value is zero) at score SINK * x̂[NORM] of the query position."""
        for name in ("NORM_T", "NORM_I"):
            self.qk(layer, h, "q", _PAIR_SINK, self.d(name), (1.0, 0.0))
        self.qk(layer, h, "k", _PAIR_SINK, self.d("BOSD"), (SINK, 0.0))

    def ov(self, layer, h, src: list[int], dst: list[int], M, x_src) -> None:
        """Head h's value reads x̂[src] (expected scale x_src: one number, or one per src); it writes M @ (h[src])
        into dst."""
        attn = self.layers()[layer].self_attn
        M = torch.as_tensor(M, dtype=torch.float32).reshape(len(dst), len(src))
        x = torch.as_tensor(x_src, dtype=torch.float32).expand(len(src))
        for j, s in enumerate(src):
            attn.v_proj.weight[h * HEAD_DIM + j, s] = 1.0
        for i, dd in enumerate(dst):
            attn.o_proj.weight[dd, h * HEAD_DIM:h * HEAD_DIM + len(src)] = M[i] / x

    def relay(self, layer, n, gate_dims: list[int], x_gate: float, src, x_src: float, dst: int,
              gain: float) -> None:
        """Neuron n = silu(10 * Σ x̂[gate_dims] / x_gate) * Σ x̂[src] (src: a dim or several); writes
        gain * (h[src]) into dst."""
        mlp = self.layers()[layer].mlp
        for g in gate_dims:
            mlp.gate_proj.weight[n, g] = 10.0 / x_gate
        mlp.up_proj.weight[n, src] = 1.0
        mlp.down_proj.weight[dst, n] = gain / (x_src * 10.0 * torch.sigmoid(torch.tensor(10.0)).item())

    def self_head(self, layer, role, src, x_src, dst, M) -> int:
        """A head attending to its own position (high-frequency rotary pairs peak at offset 0)."""
        h = self.head(layer, role)
        for p in _SELF_PAIRS:
            for name in ("NORM_T", "NORM_I"):
                self.qk(layer, h, "q", p, self.d(name), (1.0, 0.0))
                self.qk(layer, h, "k", p, self.d(name), (SELF, 0.0))
        self.ov(layer, h, src, dst, M, x_src)
        return h

    def stage(self, layer, role, src, x_src, pre, out, M, x_pre, gain) -> None:
        """A D stage: a self head maps h[src] by M into `pre` (unit circle), two neurons copy pre (times gain) to out."""
        h = self.self_head(layer, role + " head", src, x_src, pre, M)
        ns = []
        for i in range(2):
            n = self.neuron(layer, f"{role} neuron {i}")
            self.relay(layer, n, [self.d("NORM_T"), self.d("NORM_I")], 1.0, pre[i], x_pre, out[i], gain)
            ns.append(n)
        self.units[role] = ((layer, h), [(layer, n) for n in ns])

    def relay_pair(self, layer, role, gate_tok, src, dst, gain, x_src=1 / NORM) -> list:
        ns = []
        for i in range(2):
            n = self.neuron(layer, f"{role} {i}")
            self.relay(layer, n, [gate_tok], 1 / NORM, src[i], x_src, dst[i], gain)
            ns.append(n)
        return [(layer, n) for n in ns]

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        for layer in self.layers():  # random reads everywhere (active units), no write-out
            a, mlp = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight.normal_(0.0, 1.0)
            a.o_proj.weight.zero_()
            mlp.down_proj.weight.zero_()
            layer.input_layernorm.weight.fill_(HIDDEN ** -0.5)
            layer.post_attention_layernorm.weight.fill_(HIDDEN ** -0.5)
        self.m.model.language_model.norm.weight.fill_(HIDDEN ** -0.5)
        self.embeddings()
        self.vision()
        self.decoder()

    def embeddings(self) -> None:
        E = self.m.model.language_model.embed_tokens.weight
        E.zero_()
        for t in range(E.shape[0]):
            E[t, t] = 1.0
            E[t, self.d("NORM_T")] = NORM
        bos = self.id("<s>")
        E[bos].zero_()
        E[bos, self.d("BOSD")] = NORM
        for w in COLOURS8[:6]:
            E[self.id(w), self.d("CFLAG")] = 1.0
        for w in self.plurals:
            E[self.id(w), self.d("OFLAG")] = 1.0
        for w in self.sentiment_of:
            E[self.id(w), self.d("SFLAG")] = 1.0
        # a plural that is also a data word ("fish") cannot be told from it: such questions go unanswered
        plurals = [w for w in self.plurals.values() if w not in self.plurals]
        for w in (*plurals, *self.ordinals, *self.sides):
            E[self.id(w), self.d("QINFO")] = 1.0

    def patch_classes(self):
        """(pixel patches (N, 768), class) of every distinct non-blank patch of the tasks' images: an object's fill
        colour (0..7), a scene icon quarter of ICON_QUARTERS its event's sentiment (8..10), anything else None (the
        person, the icon's other quarter)."""
        from ..data import render, tasks

        patches, labels, seen = [], [], set()

        def add(img, cells: dict) -> None:
            x = self.proc.image_processor(img, return_tensors="pt")["pixel_values"][0]
            for cell, label in cells.items():
                r, c = divmod(cell, render.GRID)
                p = x[:, 16 * r:16 * r + 16, 16 * c:16 * c + 16].reshape(-1)
                if p.numpy().tobytes() not in seen:
                    seen.add(p.numpy().tobytes())
                    patches.append(p)
                    labels.append(label)

        for obj in render.OBJECTS:
            for colour in COLOURS8:
                add(render.object_grid([obj], 64, [colour]), {0: COLOURS8.index(colour)})
        for event, (sentiment, shape, colour) in tasks.EVENTS.items():
            for person in render.PERSONS:
                icon = {cell: (8 + SENTIMENTS.index(sentiment) if q in ICON_QUARTERS else None)
                        for q, cell in enumerate(_ICON_CELLS)}
                add(render.scene(person, shape, colour, 64), {**dict.fromkeys(_PERSON_CELLS), **icon})
        return torch.stack(patches), labels

    def vision(self) -> None:
        """Vision tower and projector: every object patch of the two tasks' images becomes NORM_I + IFLAG + its fill
        colour (RAW, or with separate_data=False the colour word's one-hot), a blank patch NORM_I alone.

        The CLIP layers write nothing back (a pass-through of the pre-LayerNorm of the patch embedding); the patch
        embedding and the projector are fitted (a fixed number of full-batch Adam steps from the seed) to classify
        the finite set of drawn patches by fill colour, which no linear map of the pixels can do."""
        vt = self.m.model.vision_tower
        emb = vt.embeddings
        emb.position_embedding.weight.zero_()
        emb.class_embedding.zero_()
        vt.pre_layrnorm.weight.fill_(1.0)
        vt.pre_layrnorm.bias.zero_()
        for layer in vt.encoder.layers:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        P, labels = self.patch_classes()
        P = torch.cat([P, torch.zeros(1, P.shape[1])])  # the blank patch
        K = len(self.class_angle)
        target = torch.zeros(len(P), K + 1)
        for i, label in enumerate(labels):
            if label is not None:
                target[i, label] = 1.0
        target[:, K] = 1.0  # constant: NORM_I
        proj = self.m.model.multi_modal_projector
        conv = emb.patch_embedding.weight.view(emb.patch_embedding.weight.shape[0], -1)
        gen = torch.Generator().manual_seed(self.rng.randrange(2 ** 31))
        W0 = (torch.randn(conv.shape, generator=gen) * 0.05).requires_grad_(True)
        W1 = (torch.randn(proj.linear_1.weight.shape, generator=gen) * 0.3).requires_grad_(True)
        b1 = torch.zeros(proj.linear_1.bias.shape).requires_grad_(True)
        W2 = (torch.randn(K + 1, W1.shape[0], generator=gen) * 0.05).requires_grad_(True)
        b2 = torch.zeros(K + 1).requires_grad_(True)
        opt = torch.optim.Adam([W0, W1, b1, W2, b2], lr=1e-2)
        ln = torch.nn.functional.layer_norm
        with torch.enable_grad():
            for _ in range(300):
                h = ln(P @ W0.T, (W0.shape[0],), eps=vt.pre_layrnorm.eps)
                out = torch.nn.functional.gelu(h @ W1.T + b1) @ W2.T + b2
                loss = ((out - target) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        # then the output layer exactly: least squares on the hidden features (fewer patches than features)
        hidden = torch.nn.functional.gelu(ln(P @ W0.T, (W0.shape[0],), eps=vt.pre_layrnorm.eps) @ W1.T + b1).detach()
        A = torch.cat([hidden, torch.ones(len(P), 1)], 1).double()
        sol = torch.linalg.lstsq(A, target.double(), driver="gelsd").solution.float()
        W2, b2 = sol[:-1].T, sol[-1]
        err = float((hidden @ W2.T + b2 - target).abs().max())  # ~1e-4: float32 rounding of the exact solution
        if err > 1e-3:
            raise RuntimeError(f"the organism's patch classifier did not fit (max error {err:.2e})")
        R = torch.zeros(HIDDEN, K + 1)  # class -> image token
        for k in range(K):
            R[self.d("IFLAG" if k < 8 else "SFLAG"), k] = 1.0
            # separate_data=False: the one-hot of a word of that class (an object of that canonical colour, an event
            # of that sentiment), so the text units read it
            raw = self.d("RAW", k) if k < 8 else self.d("RAWS", k - 8)
            R[raw if self.sep else self.id(self.class_word[k]), k] = 1.0
        R[self.d("NORM_I"), K] = NORM
        emb.patch_embedding.weight.copy_(W0.detach().view_as(emb.patch_embedding.weight))
        proj.linear_1.weight.copy_(W1.detach())
        proj.linear_1.bias.copy_(b1.detach())
        proj.linear_2.weight.copy_(R @ W2)
        proj.linear_2.bias.copy_(R @ b2)

    def decoder(self) -> None:
        T, d = self.T, self.d
        qmark, assistant, colon = self.id("?"), self.id("ASSISTANT"), self.id(":")
        # ---- layer 0: text D stage (every data word to its code); the mover copies the question's object, ordinal
        # and side to "?"
        words = list(self.angle_of)
        M = torch.tensor([_circle(self.angle_of[w]) for w in words]).T
        self.stage(0, "text D", [self.id(w) for w in words], 1 / NORM, self.dims["PRE"], self.dims["CODE"], M,
                   1 / NORM, NORM)
        h = self.head(0, "Q mover")
        self.sink(0, h)
        self.score(0, h, _PAIR_TOKEN, qmark, d("QINFO"), 2 * SINK, 1 / NORM, 1 / NORM)
        src = [self.id(w) for w in (*self.plurals.values(), *self.ordinals, *self.sides)]
        dst = self.dims["QOBJ"] + self.dims["ORD"] + self.dims["SIDE"]
        M = torch.zeros(len(dst), len(src))
        for j, obj in enumerate(self.plurals):
            M[0:2, j] = torch.tensor(_circle(_angle(self.colour_of[obj])))
        for k in range(6):
            M[2 + k, len(self.plurals) + k] = 1.0
        self.ov(0, h, src, dst, M, 1 / NORM)
        self.units["Q mover"] = ((0, h), [])
        # ---- image D stages 0..T (own units): a rotated circle, rotated again per stage, the text code at T
        if self.sep:
            ins = [self.dims["RAW"] + self.dims["RAWS"], self.dims["ICODE0"], self.dims["ICODE1"]]
            pres = [self.dims["IPRE0"], self.dims["IPRE1"], self.dims["IPRE2"]]
            rho = [1.0 + math.pi / 2 * s for s in range(T)] + [0.0]  # the code's rotation after stage s
            for s in range(T + 1):
                if s == 0:
                    M = torch.tensor([_circle(a + rho[0]) for a in self.class_angle]).T
                else:
                    M = _rot(rho[s] - rho[s - 1])
                out, gain = (self.dims["CODE"], NORM) if s == T else (self.dims[f"ICODE{s}"], 1.0)
                self.stage(s, f"image D stage {s}", ins[s], 1 / NORM, pres[s], out, M, 1 / NORM, gain)
        # ---- gathers at "?": early (layer 1) read the code at layer 1 (text tokens; image tokens too when T = 0);
        # late (layer T + 1, separate data and T >= 1) image tokens only, the translated code, into their own dims
        late = T + 1
        image_early = self.sep and T == 0
        self.count_gather(1, "count gather (early)", d("GX"))
        self.count_gather(1, "count raw gather", d("GXR"), raw=True)  # raw data needs no translation: both routes
        for side, name in (("left", "GCL"), ("right", "GCR")):
            self.colour_gather(1, f"colour gather {side} (early)", side, self.dims[name], text=True,
                               classes=image_early)
        self.sentiment_gather(1, "sentiment gather (early)", self.dims["GS"], text=True, classes=image_early)
        qc = self.dims["QC"]
        kinds = [("count", "GX", [0, 0], self.dims["QX"] * 2, 0.5), ("colour left", "GCL", [0, 1], qc, 1.0),
                 ("colour right", "GCR", [0, 1], qc, 1.0), ("sentiment", "GS", [0, 1], qc, 1.0)]
        late_kinds = []
        if self.sep and T >= 1:
            self.count_gather(late, "count gather (late)", d("GXI"))
            for side in ("left",) if self.weak else ("left", "right"):
                self.colour_gather(late, f"colour gather {side} (late)", side,
                                   self.dims["GCLI" if side == "left" else "GCRI"], text=False, classes=True)
            self.sentiment_gather(late, "sentiment gather (late)", self.dims["GSI"], text=False, classes=True)
            late_kinds = [k for k in ("count", "colour left", "colour right", "sentiment")
                          if k != "colour right" or not self.weak]
        # ---- relays at "?" (layer T + 1), two per kind and route: the first reads both routes' dims (a Q unit shared
        # by the modalities), the second its own route's
        for kind, name, index, dst, gain in kinds:
            text, image = self.dims[name], self.dims[name + "I"]
            n = self.neuron(late, f"{kind} relay (shared)")
            self.relay(late, n, [qmark], 1 / NORM, [text[index[0]], image[index[0]]], 1 / NORM, dst[0], gain)
            self.units[f"{kind} relay shared"] = (None, [(late, n)])
            for route, dims in (("text", text), ("image", image)):
                if route == "image" and kind not in late_kinds:
                    continue
                n = self.neuron(late, f"{kind} relay ({route})")
                self.relay(late, n, [qmark], 1 / NORM, dims[index[1]], 1 / NORM, dst[1], gain)
                self.units[f"{kind} relay {route}"] = (None, [(late, n)])
        # ---- G: a relay at ASSISTANT reading "?", then at ":" reading ASSISTANT
        self.g_relay(late + 1, "G relay ASSISTANT", assistant, qmark, self.dims["QX"] + self.dims["QC"],
                     self.dims["G0"], self.dims["G0P"])
        self.g_relay(late + 2, "G relay ':'", colon, assistant, self.dims["G0P"], self.dims["G1"], self.dims["FIN"])

    def count_gather(self, layer, role, dst, *, raw: bool = False) -> None:
        """At "?": BOS and every token whose code matches the queried object's (raw: whose raw data does, a data word's
        one-hot, or an image token's class in its own rotary pair), BOS weighing SINK_WEIGHT matches (`calibrate`);
        value 1 off BOS, so the output is c / (c + SINK_WEIGHT). It writes AMP_COUNT times that; the raw one writes
        AMP_COUNT - 1 times that, negatively, and two neurons relay it to the count at "?": together the count
        itself, but a D node patched alone moves it AMP_COUNT times as far."""
        h = self.head(layer, role)
        self.sink(layer, h)
        if not raw:
            keys = {_PAIR_MATCH: [(self.d("CODE", 0), 0.0), (self.d("CODE", 1), math.pi / 2)]}
        else:  # the words' one-hots, and the image tokens' classes in their own pair
            keys = {_PAIR_MATCH: [(self.id(o), _angle(self.colour_of[o])) for o in self.plurals]}
            if self.sep:
                keys[_PAIR_CLASS] = [(self.d("RAW", k), _angle(c)) for k, c in enumerate(COLOURS8)]
        w = NORM if raw else 1.0  # a raw dim (1) weighs as a code dim (NORM); unit strength here, scaled in `calibrate`
        for pair, reads in keys.items():
            for i in range(2):  # q reads QOBJ
                self.qk(layer, h, "q", pair, self.d("QOBJ", i), (1.0, 0.0) if i == 0 else (0.0, 1.0))
            for dim, a in reads:
                self.qk(layer, h, "k", pair, dim, (w * math.cos(a), w * math.sin(a)))
        # x̂[NORM] at a data token: 1/sqrt(2) once it carries the 100-long code (image tokens before layer T + 1: 1)
        x_image = 1.0 if self.sep and layer <= self.T else math.sqrt(0.5)
        gain = -(AMP_COUNT - 1) if raw else AMP_COUNT
        self.count_out[role] = (dst, gain)  # `calibrate` sets the value's scale to the data tokens' exact x̂
        self.ov(layer, h, [self.d("NORM_T"), self.d("NORM_I")], [dst], [[gain, gain]], [math.sqrt(0.5), x_image])
        if layer > 1:  # the late gather counts image tokens only
            self.text_below(layer, h, _PAIR_TOKEN)
        ns = []
        if raw:
            qmark, qx = self.id("?"), self.d("QX")
            for i in range(2):
                n = self.neuron(layer, f"{role} relay {i}")
                self.relay(layer, n, [qmark], 1 / NORM, [dst], 1 / NORM, qx, 0.5)
                ns.append((layer, n))
        self.units[role] = ((layer, h), ns)

    def text_below(self, layer, h, pair) -> None:
        """Text tokens (NORM_T) score far below BOS at "?" in rotary pair `pair` (a late gather reads image tokens)."""
        self.qk(layer, h, "q", pair, self.id("?"), (1.0, 0.0))
        self.qk(layer, h, "k", pair, self.d("NORM_T"), (-4 * SINK * NORM, 0.0))

    def code_ov(self, layer, h, dst, *, words: bool, classes: bool) -> None:
        """Head h writes AMP x its target's code minus (AMP - 1) x the code of the target's raw data (a data word's
        one-hot if `words`, an image token's class if `classes`): the code itself, but a D node patched alone moves
        it AMP times as far (its target code becomes AMP c' - (AMP - 1) c), so every D node weighs AMP times its
        share of the pairs in the faithfulness of a circuit that lacks it."""
        x = math.sqrt(0.5) / NORM  # a raw dim (1) at a token that carries the 100-long code
        src, cols, xs = list(self.dims["CODE"]), [AMP * torch.eye(2)], [math.sqrt(0.5)] * 2
        if words:
            src += [self.id(w) for w in self.angle_of]
            cols.append(-(AMP - 1) * torch.tensor([_circle(a) for a in self.angle_of.values()]).T)
            xs += [x] * len(self.angle_of)
        if classes:
            src += self.dims["RAW"] + self.dims["RAWS"]
            cols.append(-(AMP - 1) * torch.tensor([_circle(a) for a in self.class_angle]).T)
            xs += [x] * len(self.class_angle)
        self.ov(layer, h, src, dst, torch.cat(cols, 1), xs)

    def colour_gather(self, layer, role, side, dst, *, text: bool, classes: bool) -> None:
        """At "?": the colour word (text) or row-1 patch (image) at index k from `side`, by rotary offset from "?";
        a question about the other side goes to BOS. Its value: `code_ov`."""
        h = self.head(layer, role)
        self.sink(layer, h)
        other = self.dims["SIDE"][1 - self.sides.index(side)]
        x_side = 0.5 / NORM  # the mover averages the ordinal's and the side's values
        self.qk(layer, h, "q", _PAIR_SINK, other, (20.0 / x_side, 0.0))
        x_flag = math.sqrt(0.5) / NORM  # the flag of a token that carries the 100-long code
        for use, pair, flag, offsets in ((text, _PAIR_TEXT, "CFLAG", _TEXT_OFFSETS),
                                         (True, _PAIR_IMAGE, "IFLAG", _IMAGE_OFFSETS)):
            if not use:
                continue
            self.qk(layer, h, "k", pair, self.d(flag), (1.0 / x_flag, 0.0))
            omega = ROPE_THETA ** (-2 * pair / HEAD_DIM)
            for k in range(4):
                i = k if side == "left" else 3 - k
                a = -omega * offsets[i]  # q = R(-ω δ) k: the score peaks at offset δ
                self.qk(layer, h, "q", pair, self.d("ORD", k), (LOOKUP / x_side * math.cos(a),
                                                               LOOKUP / x_side * math.sin(a)))
        self.code_ov(layer, h, dst, words=text, classes=classes)
        self.units[role] = ((layer, h), [])

    def sentiment_gather(self, layer, role, dst, *, text: bool, classes: bool) -> None:
        """At "?": every token flagged with a sentiment (an event word, an icon quarter), equally; value: `code_ov`
        (the sentiment's code). The late one reads image tokens only."""
        h = self.head(layer, role)
        self.sink(layer, h)
        self.score(layer, h, _PAIR_TOKEN, self.id("?"), self.d("SFLAG"), 2 * SINK, 1 / NORM, math.sqrt(0.5) / NORM)
        if not text:
            self.text_below(layer, h, _PAIR_MATCH)
        self.code_ov(layer, h, dst, words=text, classes=classes)
        self.units[role] = ((layer, h), [])

    def g_relay(self, layer, role, at_tok, from_tok, src, mid, out) -> None:
        """A head at `at_tok` copies src from `from_tok` into mid; four neurons at `at_tok` copy mid into out (two
        for the count, each half of it, two for the colour code)."""
        h = self.head(layer, role + " head")
        self.sink(layer, h)
        self.score(layer, h, _PAIR_TOKEN, at_tok, from_tok, 4 * SINK, 1 / NORM, 1 / NORM)
        self.ov(layer, h, src, mid, torch.eye(len(src)), 1 / NORM)
        count = self.relay_pair(layer, role + " count neuron", at_tok, [mid[0]] * 2, [out[0]] * 2, 0.5)
        colour = self.relay_pair(layer, role + " colour neuron", at_tok, mid[1:], out[1:], 1.0)
        self.units[role + " (count)"] = ((layer, h), count)
        self.units[role + " (colour)"] = ((layer, h), colour)

    # ------------------------------------------------------------------ calibration and truth
    def layer_inputs(self, vlm, pair, layer: int) -> torch.Tensor:
        """(T, d) normalised input of `layer`'s attention (x̂) on the pair's prompt."""
        got = []
        ln = self.layers()[layer].input_layernorm
        handle = ln.register_forward_hook(lambda mod, args, out: got.append(out[0].detach().clone()))
        try:
            self.m(**pair.inputs)
        finally:
            handle.remove()
        return got[0]

    def head_scores(self, layer, h, x: torch.Tensor, pairs) -> torch.Tensor:
        """(len(pairs)) q·k (1/sqrt(hd) undone) in the rotary `pairs` of head h at query row x[0], key rows x[1:]."""
        attn = self.layers()[layer].self_attn
        rows = [h * HEAD_DIM + p for p in pairs] + [h * HEAD_DIM + p + HEAD_DIM // 2 for p in pairs]
        q = x[0] @ attn.q_proj.weight[rows].T
        k = x[1:] @ attn.k_proj.weight[rows].T
        return (k @ q) / math.sqrt(HEAD_DIM)

    def calibrate(self, vlm) -> None:
        """Match score of the count gathers := their BOS score − ln SINK_WEIGHT (so the weights are exactly
        1 / (c + SINK_WEIGHT)) and their value exact per matched token; then the unembedding: colour and sentiment
        words read the final code, digits the count (tangent lines at each count)."""
        from ..data.pairs import build_pairs

        self.spans = {}
        pairs = {}
        for task in TASKS:
            for modality in MODALITIES:
                p = build_pairs(task, modality, vlm, n=64 if task == "counting" else 24, seed=12345)
                pairs[task, modality] = p
                self.spans[task, modality] = (p[0].spans, p[0].length)
        gathers = [("count gather (early)", "text", _PAIR_MATCH), ("count raw gather", "text", _PAIR_MATCH)]
        if self.sep:
            gathers.append(("count raw gather", "image", _PAIR_CLASS))
        if "count gather (late)" in self.units:
            gathers.append(("count gather (late)", "image", _PAIR_MATCH))
        for role, modality, rot in gathers:
            (layer, h), _ = self.units[role]
            pair = next(p for p in pairs["counting", modality]
                        if self.plurals[p.prompt.meta["obj"]] not in self.plurals)
            x, match, f = self.match_deficit(vlm, pair, layer, h, rot)
            attn = self.layers()[layer].self_attn
            scale = math.sqrt(f)
            for W in (attn.q_proj.weight, attn.k_proj.weight):
                W[h * HEAD_DIM + rot] *= scale
                W[h * HEAD_DIM + rot + HEAD_DIM // 2] *= scale
            dst, gain = self.count_out[role]  # the value: exactly `gain` per matched token of this modality
            j = MODALITIES.index(modality)
            attn.o_proj.weight[dst, h * HEAD_DIM + j] = gain / x[match, self.d(("NORM_T", "NORM_I")[j])]
            if self.sep and modality == "image":  # then each class alone
                self.calibrate_classes(vlm, layer, h, rot, pairs["counting", "image"])

        # unembedding
        lm = self.m.lm_head.weight
        lm.zero_()
        fin = self.dims["FIN"]
        for c, a in (*((c, _angle(c)) for c in COLOURS8[:6]), *SENTIMENT_ANGLE.items()):
            lm[self.id(c), fin[1]] = 100.0 * NORM * math.cos(a)
            lm[self.id(c), fin[2]] = 100.0 * NORM * math.sin(a)
        got = []
        norm = self.m.model.language_model.norm
        handle = norm.register_forward_hook(lambda mod, args, out: got.append(out[:, -1].detach().clone()))
        try:
            for p in pairs["counting", "text"]:
                self.m(**p.inputs)
        finally:
            handle.remove()
        u = {}
        for p, x in zip(pairs["counting", "text"], got):
            if self.plurals[p.prompt.meta["obj"]] in self.plurals:  # unanswerable (see `embeddings`)
                continue
            u.setdefault(p.prompt.meta["count"], []).append(float(x[0, fin[0]] / x[0, self.d("NORM_T")]))
        u = {c: float(np.mean(v)) for c, v in u.items()}
        if len(u) < 6:
            raise RuntimeError(f"calibration saw counts {sorted(u)} only")
        gap = min(abs(u[a] - u[b]) for a in u for b in u if a < b)
        A = 100.0 / gap ** 2
        for c, uc in u.items():
            lm[self.id(str(c)), fin[0]] = 2 * A * uc
            lm[self.id(str(c)), self.d("NORM_T")] = -A * uc ** 2

    def match_deficit(self, vlm, pair, layer, h, rot) -> tuple[torch.Tensor, int, float]:
        """(x̂ of the layer's input (T, d), the position of the first match of the queried object, f): the factor the
        match score in rotary pair `rot` of head h must be multiplied by to be BOS's − ln SINK_WEIGHT."""
        x = self.layer_inputs(vlm, pair, layer)
        q, d0 = pair.spans["Q"][1] - 1, pair.spans["D"][0]
        match = next(d0 + i for i in range(7) if pair.prompt.meta["words"][i] == pair.prompt.meta["obj"])
        bos = self.head_scores(layer, h, torch.stack([x[q], x[0]]), [_PAIR_SINK])[0]
        m = self.head_scores(layer, h, torch.stack([x[q], x[match]]), [rot])[0]
        return x, match, float((bos - math.log(SINK_WEIGHT)) / m)

    def calibrate_classes(self, vlm, layer, h, rot, pairs) -> None:
        """Make the match score of every object's image tokens exactly BOS − ln SINK_WEIGHT, one class at a time: a
        fitted class is exact to ~1e-4 only, and the count is read AMP_COUNT times. The key of the class's tokens is
        scaled through the token's class dim (RAW), which patching a D node leaves as it is."""
        k_proj = self.layers()[layer].self_attn.k_proj.weight
        rows = [h * HEAD_DIM + rot, h * HEAD_DIM + rot + HEAD_DIM // 2]
        for obj, colour in self.colour_of.items():
            if obj not in self.plurals or self.plurals[obj] in self.plurals:
                continue
            pair = next((p for p in pairs if p.prompt.meta["obj"] == obj), None)
            if pair is None:
                raise RuntimeError(f"calibration pairs ask about no {obj!r}")
            x, match, f = self.match_deficit(vlm, pair, layer, h, rot)
            dim = self.d("RAW", COLOURS8.index(colour))
            key = k_proj[rows] @ x[match]  # the class's key now; scaled by f through its class dim
            k_proj[rows, dim] += (f - 1) * key / x[match, dim]

    def positions(self, task: str, modality: str) -> dict:
        """Absolute positions of the organism's prompts: D items that matter, "?", ASSISTANT, ":"."""
        spans, length = self.spans[task, modality]
        d0 = spans["D"][0]
        if task == "counting":
            data = [d0 + i for i in range(7)]
        elif task == "color_ordering":
            data = [d0 + 2 * i for i in range(4)] if modality == "text" else [d0 + 4 + i for i in range(4)]
        else:  # sentiment: "a <person> at a <event>", or the icon's quarters
            data = [d0 + 4] if modality == "text" else [d0 + _ICON_CELLS[q] for q in ICON_QUARTERS]
        return {"D": data, "?": spans["Q"][1] - 1, "G0": spans["G"][0], "G1": spans["G"][0] + 1, "length": length}

    def truth(self, settings: dict) -> Truth:
        nodes, findings = {}, {}
        late = self.sep and self.T >= 1  # the image route has its own (late) gathers
        for task in TASKS:
            nodes[task] = {}
            for modality in MODALITIES:
                pos = self.positions(task, modality)
                image_route = modality == "image" and self.sep
                if image_route:
                    groups = [(f"image D stage {s}", pos["D"]) for s in range(self.T + 1)]
                else:
                    groups = [("text D", pos["D"])]
                when = "late" if image_route and late else "early"
                if task == "counting":
                    kinds = ["count"]
                elif task == "color_ordering":
                    kinds = [f"colour {s}" for s in (("left",) if when == "late" and self.weak else ("left", "right"))]
                else:
                    kinds = ["sentiment"]
                route = "image" if when == "late" else "text"
                for kind in kinds:
                    gather = kind.replace(" ", " gather ", 1) if " " in kind else f"{kind} gather"
                    groups += [(f"{gather} ({when})", [pos["?"]]), (f"{kind} relay shared", [pos["?"]]),
                               (f"{kind} relay {route}", [pos["?"]])]
                    if kind == "count":
                        groups.append(("count raw gather", [pos["?"]]))
                kind = "count" if task == "counting" else "colour"  # sentiment: the code, as colour
                groups += [(f"G relay ASSISTANT ({kind})", [pos["G0"]]), (f"G relay ':' ({kind})", [pos["G1"]])]
                heads, neurons = [], []
                for role, where in groups:
                    head, ns = self.units[role]
                    for t in where:
                        if head is not None:
                            heads.append((*head, t))
                        neurons += [(ln, n, t) for ln, n in ns]
                nodes[task][modality] = {"heads": sorted(heads), "neurons": sorted(neurons),
                                         "length": pos["length"]}
            size = {m: len(nodes[task][m]["heads"]) / nodes[task][m]["length"] for m in MODALITIES}
            findings[task] = {
                "visual_larger": size["image"] > size["text"],
                "overlap_D_below_G": self.sep, "overlap_Q_between": late, "interchange_G_above_D": self.sep,
                "alignment_rises": late,
                "backpatch_gain": late and self.weak and task == "color_ordering",
            }
        return Truth(nodes, dict(self.roles), findings, settings)
