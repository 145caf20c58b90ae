"""The whole study for one model, as resumable steps writing results/<model>/.

Each step writes one JSON file (atomically) and is skipped when that file exists, so an
interrupted run resumes where it stopped. Large intermediates (per-pair scores) live in
<model>/.cache/. The figures (figures.py) and the report read only the JSON files. The steps
are the only writers of these files: the command line's per-step commands run them too.

Layout: <out>/<model>/<task>/<modality>/{accuracy,curve,position_effect}.json, scores and circuit
(.safetensors); <out>/<model>/<task>/{overlap,interchange,alignment,backpatch}.json.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..analyses.alignment import alignment
from ..analyses.backpatch import answer_ids, backpatch, refusal
from ..analyses.interchange import interchange_both, margin, readable
from ..analyses.overlap import overlap, resampled_niou
from ..circuits.candidates import candidates, certify
from ..circuits.circuit import Circuit, Scores
from ..circuits.metrics import faithfulness_values
from ..circuits.stats import CI, bootstrap, bootstrap_mean, index_matrices, interval
from ..data import tasks as task_defs
from ..data.pairs import SPANS, build_pairs, split
from ..execution import budget
from ..execution.budget import parse as parse_budget
from ..execution.checkpoint import fingerprint
from ..execution.remote import is_hosted
from ..execution.store import atomic, model_dir, read_json, write_json
from ..methods.ablation import faithfulness_curve, position_effect
from ..methods.attribution import attribute
from ..methods.predict import keep_correct, pairs_correct


class TooFewPairs(RuntimeError):
    """The model answers too few pairs of a task correctly to find a circuit."""


@dataclass(frozen=True)
class Method:
    """The method's choices where the study's reference code differs from ours (docs/method.md section 11).

    Each field's first value is ours (the default); `REFERENCE` holds the reference code's."""

    head_score: str = "signed_sum"  # | "abs_elementwise"  (attribute)
    interpolate: str = "merged"  # | "tokens"  (attribute)
    positions: str = "model"  # | "1d"  (build_pairs: the reference's Qwen2-VL port)
    aggregation: str = "ratio_of_means"  # | "mean_of_ratios"  (faithfulness)
    niou: str = "normalised"  # | "reference": IoU − 2b  (overlap)
    random_draw: str = "uniform"  # | "reference": randint with the upper bound included  (interchange)
    backpatch_selection: str = "split"  # | "reported": chosen on the reported prompts  (backpatch)


OURS = Method()
REFERENCE = Method("abs_elementwise", "tokens", "1d", "mean_of_ratios", "reference", "reference", "reported")


def _portable(config: dict) -> dict:
    """A model config without what differs between machines for the same model (where it was loaded from,
    the transformers version that wrote it), nested configs included."""
    return {k: _portable(v) if isinstance(v, dict) else v for k, v in config.items()
            if k not in ("_name_or_path", "transformers_version")}


def check_settings(tasks, *, n: int, steps: int, resamples: int, threshold: float = 0.8, image_size=None,
                   data_dir=None, counterfactuals: str = "random") -> None:
    """Refuse settings no study can run with, before any model is loaded (a row-based task's data included)."""
    for name, (value, least) in {"n": (n, 4), "steps": (steps, 1), "resamples": (resamples, 10)}.items():
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE):
        raise ValueError(f"--image-size must be an integer >= {MIN_IMAGE_SIZE} pixels (or left out for the study's "
                         f"size), got {image_size!r}")
    for task in tasks:
        t = task_defs.get_task(task)  # an unknown name: a clear error listing the known ones
        task_defs.pair_function(t, counterfactuals)  # an unknown counterfactuals setting: a clear error
        if t.rows is not None and data_dir is not None:
            t.rows(data_dir)  # a missing or malformed CSV fails now, not after another task's steps


#: Smallest --image-size (a few patches of any family); the largest is what the memory budget can render.
MIN_IMAGE_SIZE = 28
#: Bytes per pixel that rendering and preprocessing an image hold at once (RGB, float32 copies).
PIXEL_BYTES = 16


def check_routing(model, routing: str) -> None:
    """Refuse a routing the model's comparisons of p and p' are not defined under, before any work."""
    if routing not in ("held", "free"):
        raise ValueError(f"routing must be 'held' or 'free', got {routing!r}")
    sparse = sum(model.experts_of(layer) is not None for layer in model.layers(model.hf_model))
    if sparse and routing != "held":
        raise ValueError(f"{model.name} is a mixture-of-experts model ({sparse} sparse layers): attribution, patching and "
                         "ablation need a fixed routing, and routing='free' would let top-k switches between p' and p "
                         "break the integrated-gradient path and mix p' neurons into p's experts; use routing='held' "
                         "(every forward routed as the clean prompt p; docs/families-2026.md)")


@dataclass
class Study:
    """Settings of one study run; `dir` is <out>/<model name>/."""

    model: object  # a loaded VLM
    out: str = "results"
    tasks: tuple[str, ...] = task_defs.TASKS
    n: int = 48  # correctly answered pairs per task and modality (75 % discovery, 25 % evaluation)
    steps: int = 5
    seed: int = 0
    resamples: int = 1000
    threshold: float = 0.8
    all_prompts: bool = False
    data_dir: str | None = None
    force: bool = False
    image_size: int | None = None  # side of rendered images (None: the model's, the study's size for its family)
    position_probes: int | None = 64  # positions the exact position effect probes at most (None: all)
    fractions: tuple[float, ...] | None = None  # circuit fractions of the faithfulness curve (None: MIB + fine grid)
    counterfactuals: str = "random"  # how p' is drawn: "random" (the study's) or "minimal" (tasks.COUNTERFACTUALS)
    method: Method = OURS  # or REFERENCE, or single reference choices: Method(head_score="abs_elementwise")
    reference: bool = False  # True: method = REFERENCE, the study's code reproduced
    # Mixture-of-experts models: "held" (every forward of a pair routed as its clean prompt p) is the only routing
    # the comparisons of p and p' are defined under, ours and in reference mode alike (the reference code had no MoE
    # model); "free" (the router recomputed at every input) is refused for them (docs/families-2026.md). Not part of
    # `settings`: no result depends on it.
    routing: str = "held"
    memory_budget: int | str | None = None  # bytes, "40GB" or "auto" for every forward (None: the model's)
    max_per_pair_bytes: int = 2 * 2**30  # keep per-pair scores (for the nIoU CI) only below this size
    _memo: dict = field(default_factory=dict, repr=False)  # pairs, scores and step records built by this run

    def __post_init__(self):
        check_settings(self.tasks, n=self.n, steps=self.steps, resamples=self.resamples, threshold=self.threshold,
                       image_size=self.image_size, data_dir=self.data_dir, counterfactuals=self.counterfactuals)
        if self.reference:
            self.method = REFERENCE
        check_routing(self.model, self.routing)
        if self.memory_budget is not None:  # a copy with this budget: the caller's model is left as it was
            self.model = dataclasses.replace(self.model, memory_budget=parse_budget(self.memory_budget))
        have = budget.resolve(self.model.memory_budget, self.model.device)
        if self.image_size is not None and self.image_size ** 2 * PIXEL_BYTES > have:
            raise ValueError(f"--image-size {self.image_size}: rendering and preprocessing one image needs about "
                             f"{self.image_size ** 2 * PIXEL_BYTES / 2**30:.1f} GiB, more than the memory budget "
                             f"({have / 2**30:.1f} GiB); give at most {int((have / PIXEL_BYTES) ** 0.5)} pixels")

    @cached_property
    def settings(self) -> dict:
        """What a step's result depends on; stored in every record and compared when a run resumes."""
        config = _portable(self.model.hf_model.config.to_dict())
        data = sorted(p.name + ":" + fingerprint(p.read_bytes()) for p in Path(self.data_dir).rglob("*")
                      if p.is_file()) if self.data_dir else None
        return {"model": self.model.name, "model_config": fingerprint(config), "weights": self.model.weights_id,
                "n": self.n, "steps": self.steps,
                "seed": self.seed, "resamples": self.resamples, "threshold": self.threshold,
                "position_probes": self.position_probes,
                **({"fractions": list(self.fractions)} if self.fractions else {}),
                **({"counterfactuals": self.counterfactuals} if self.counterfactuals != "random" else {}),
                "all_prompts": self.all_prompts, "image_size": self.image_size or self.model.image_size,
                "wording": self.model.wording, "method": dataclasses.asdict(self.method),
                "data": fingerprint(data) if data else None}

    def settings_of(self, task: str) -> dict:
        """`settings` and the task's definition (`task_key`): what the records of one task depend on."""
        return {**self.settings, "task": task_key(task, self.counterfactuals)}

    @property
    def dir(self) -> Path:
        return model_dir(self.out, self.model.name)

    def path(self, task: str, name: str, modality: str | None = None) -> Path:
        return self.dir / task / (modality or "") / name

    def candidates(self, task: str, modality: str):
        """Every built pair (correct or not), 3n of them (all_prompts: n)."""
        key = ("all", task, modality)
        if key not in self._memo:
            n = self.n if self.all_prompts else 3 * self.n
            pairs = build_pairs(task, modality, self.model, n=n, seed=self.seed, data_dir=self.data_dir,
                                positions=self.method.positions, image_size=self.image_size,
                                counterfactuals=self.counterfactuals)
            need, have = (budget.row_bytes(self.model, pairs[0].length, backward=True),
                          budget.resolve(self.model.memory_budget, self.model.device))
            if need > have and not is_hosted(self.model.remote):  # one row must fit, or the first backward fails
                raise ValueError(f"{task}/{modality}: one attribution row of {pairs[0].length} tokens needs about "
                                 f"{need / 2**30:.2f} GiB, more than the memory budget ({have / 2**30:.2f} GiB): give a "
                                 "smaller --image-size or a larger --memory-budget")
            try:  # back-patching scores over the answer set: a word that is no answer token fails now, not there
                answer_ids(self.model, pairs[:1])
            except ValueError as err:
                raise ValueError(f"task {task!r}: a word of its answers() cannot be scored as an answer ({err}): "
                                 "fix the task's answers()") from None
            (start, end), size = pairs[0].spans["D"], self.image_size or self.model.image_size
            shown = f"{end - start} image tokens ({size} px images)" if modality == "image" else f"{end - start} tokens"
            tqdm.write(f"{task}/{modality}: {len(pairs)} pairs of {pairs[0].length} tokens; D = {shown}")
            self._memo[key] = pairs
        return self._memo[key]

    def pairs(self, task: str, modality: str):
        """(discovery, evaluation) splits of the kept pairs."""
        key = ("kept", task, modality)
        if key not in self._memo:
            cands = self.candidates(task, modality)
            kept = cands if self.all_prompts else keep_correct(self.model, cands)[: self.n]
            if len(kept) < 4:
                raise TooFewPairs(f"{self.model.name} answers only {len(kept)} {task}/{modality} pairs correctly; "
                                   "too few for a circuit (use all_prompts for random test models)")
            self._memo[key] = split(kept)
            if len(self._memo[key][1]) < 10:
                warnings.warn(f"{task}/{modality}: only {len(self._memo[key][1])} evaluation pairs; faithfulness and "
                              "interchange intervals will be wide (more pairs: --n, or more distinct prompts)")
        return self._memo[key]


def task_key(task: str, counterfactuals: str = "random") -> str:
    """A hash of a task's definition: the source of its functions (the pair generator `counterfactuals` picks) and
    its answer set, and for a task from a file the whole file that registered it, so that a task edited under the
    same name is recomputed, not reused."""
    import inspect

    t = task_defs.get_task(task)
    parts = [t.name, t.first_token, t.answers()]
    for f in (task_defs.pair_function(t, counterfactuals), t.text, t.image, t.answers, t.rows):
        try:
            parts.append(inspect.getsource(f) if f is not None else None)
        except (OSError, TypeError):  # defined interactively: its compiled code
            parts.append(f.__code__.co_code if hasattr(f, "__code__") else repr(f))
    source = task_defs.ORIGINS.get(t.name)  # the file that registered it
    if source and Path(source).is_file() and Path(source).resolve() != Path(task_defs.__file__).resolve():
        parts.append(Path(source).read_bytes())
    return fingerprint(parts)


def _task_of(study: Study, path: Path) -> str:
    """The task a record under <out>/<model>/<task>/ belongs to."""
    return path.relative_to(study.dir).parts[0]


def _reusable(study: Study, path: Path, settings: dict | None) -> bool:
    """Whether a finished step's file can be reused: it exists, --force is off, and it was made with these settings."""
    if not path.exists() or study.force:
        return False
    wanted = study.settings_of(_task_of(study, path))
    if settings == wanted:
        return True
    changed = sorted(k for k in wanted if (settings or {}).get(k) != wanted[k])
    tqdm.write(f"{path} was made with other settings ({', '.join(changed)}): recomputing it")
    return False


def _step(study: Study, path: Path, compute):
    """Read `path` if it was made with these settings (and not study.force), else compute, write atomically
    with the settings, the step's time (wall and CPU seconds of this process) and any chunks smaller than
    canonical (`chunking`), and return."""
    if ("step", path) in study._memo:  # computed by this run (with force: once, not once per reader)
        return study._memo["step", path]
    if _reusable(study, path, read_json(path).get("settings") if path.exists() else None):
        return read_json(path)
    wall, cpu = time.perf_counter(), time.process_time()
    budget.REDUCED.clear()
    result = compute()
    result = {**result, "settings": study.settings_of(_task_of(study, path)),
              "time": {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}}
    if budget.REDUCED:  # chunks below the canonical size: the last float bits may differ (docs/reproducibility.md)
        result["chunking"] = sorted(budget.REDUCED)
    write_json(path, result)
    study._memo["step", path] = result = read_json(path)  # as a reader of the file sees it (undefined: None)
    return result


def run_accuracy(study: Study, task: str, modality: str) -> dict:
    """Top-1 accuracy on the prompts of all built pairs, with CI."""
    def compute():
        pairs = study.candidates(task, modality)
        ok = pairs_correct(study.model, pairs).float().numpy()
        return {"accuracy": bootstrap_mean(ok, resamples=study.resamples).as_dict(),
                "n_prompts": len(ok)}
    return _step(study, study.path(task, "accuracy.json", modality), compute)


def run_scores(study: Study, task: str, modality: str) -> Scores:
    """IG scores on the discovery split (per-pair values cached for the overlap bootstrap)."""
    path = study.path(task, "scores.safetensors", modality)
    cache = study.dir / ".cache" / f"{task}-{modality}-per-pair.safetensors"
    if ("scores", task, modality) in study._memo:  # computed by this run (with force: once, not once per reader)
        return study._memo["scores", task, modality]
    if _reusable(study, path, Scores.load(path).meta.get("settings") if path.exists() else None):
        s = Scores.load(path)
        if cache.exists():
            kept = load_file(cache)
            s.per_pair = (kept["heads"], kept["neurons"])
        return s
    discovery, _ = study.pairs(task, modality)
    m = study.model
    per_pair_bytes = 4 * len(discovery) * m.n_layers * (m.n_heads + m.d_mlp) * discovery[0].length
    keep = per_pair_bytes <= study.max_per_pair_bytes
    s = attribute(m, discovery, steps=study.steps, per_pair=keep, head_score=study.method.head_score,
                  interpolate=study.method.interpolate)
    s.meta["settings"] = study.settings_of(task)
    cache.unlink(missing_ok=True)  # per-pair values of an older run must not outlive it
    if keep:
        with atomic(cache) as tmp:
            save_file({"heads": s.per_pair[0].contiguous(), "neurons": s.per_pair[1].contiguous()}, tmp)
    s.save(path)
    study._memo["scores", task, modality] = s
    return s


def run_curve(study: Study, task: str, modality: str) -> dict:
    """Faithfulness curve on the evaluation split, per-fraction CIs, the discovered circuit."""
    def compute():
        s = run_scores(study, task, modality)
        _, evaluation = study.pairs(task, modality)
        agg = study.method.aggregation
        c = faithfulness_curve(study.model, s, evaluation, study.fractions, threshold=study.threshold, aggregation=agg)
        cis = [bootstrap(lambda i, ld=ld: faithfulness_values(ld[i], c.ld_full[i], c.ld_empty[i], agg), len(evaluation),
                         resamples=study.resamples, vectorised=True).as_dict() for ld in c.ld_circuits]
        path = study.path(task, "circuit.safetensors", modality)
        if not np.isfinite(c.values).any():  # m(M) = m(∅): F is 0/0 at every fraction, so no circuit can be chosen
            why = (f"F undefined: the full model's mean LD equals the fully patched one's ({float(c.ld_full.mean()):.3g}) "
                   f"on {task}/{modality}, so p' changes nothing the model reads (e.g. an image that ignores the "
                   "task's facts): no circuit fraction, overlap or interchange")
            tqdm.write(why)
            Circuit.from_scores(s, count=0).save(path)  # an empty circuit: later steps read `undefined`, not its nodes
            none = CI(float("nan"), float("nan"), float("nan")).as_dict()
            return {"fractions": c.fractions, "faithfulness": c.values, "ci": cis, "threshold": c.threshold,
                    "minimal_fraction": None, "circuit_fraction": None, "faithfulness_at_circuit": none,
                    "cpr": c.cpr, "cmd": c.cmd, "n_eval_pairs": len(evaluation), "undefined": why}
        chosen = c.minimal_fraction if c.minimal_fraction is not None else c.fractions[int(np.nanargmax(c.values))]
        Circuit.from_scores(s, fraction=chosen).save(path)
        at = c.fractions.index(chosen)
        return {"fractions": c.fractions, "faithfulness": c.values, "ci": cis, "threshold": c.threshold,
                "minimal_fraction": c.minimal_fraction, "circuit_fraction": chosen, "faithfulness_at_circuit": cis[at],
                "cpr": c.cpr, "cmd": c.cmd, "n_eval_pairs": len(evaluation)}
    return _step(study, study.path(task, "curve.json", modality), compute)


def load_circuit(study: Study, task: str, modality: str) -> Circuit:
    """The discovered circuit of a task and modality (running the curve step if needed)."""
    run_curve(study, task, modality)
    return Circuit.load(study.path(task, "circuit.safetensors", modality), model=study.model.name)


def probe_positions(spans: dict, length: int, limit: int | None) -> list[int] | None:
    """Positions the exact position effect probes: all (None) when `length` <= limit; else every Q and G
    position and evenly spaced D positions up to `limit` in all (positions outside the spans are left out)."""
    if limit is None or length <= limit:
        return None
    (d0, d1), (q0, q1), (g0, g1) = spans["D"], spans["Q"], spans["G"]
    keep = list(range(q0, q1)) + list(range(g0, g1))
    n_data = max(1, min(d1 - d0, limit - len(keep)))
    return sorted(set(np.linspace(d0, d1 - 1, n_data).round().astype(int).tolist()) | set(keep))


def run_position_effect(study: Study, task: str, modality: str) -> dict:
    """Exact effect of patching every node at a position, per span, with CIs over evaluation pairs (what the report
    shows); beside it the attributed per-position sums, signed and of |per-component score| (the study's view)."""
    def compute():
        _, evaluation = study.pairs(task, modality)
        spans = evaluation[0].spans
        probed = probe_positions(spans, evaluation[0].length, study.position_probes)
        effect = position_effect(study.model, evaluation, positions=probed).per_pair.numpy()  # (T, P), NaN unprobed
        per_span = {}
        for s, (a, b) in spans.items():
            rows = effect[a:b][~np.isnan(effect[a:b, 0])]
            per_span[s] = bootstrap_mean(rows, resamples=study.resamples).as_dict()
        scores = run_scores(study, task, modality)
        attributed, components = scores.per_position(), scores.per_position(absolute=True)
        # the study's view: per-component |attributed effects| summed at each position, averaged over a span
        per_component = {"per_position": components.tolist(),
                         "per_span": {s: float(components[a:b].mean()) for s, (a, b) in spans.items()}}
        return {"per_position": effect.mean(1).tolist(), "per_span": per_span, "spans": spans,
                "probed_positions": None if probed is None else probed, "attributed_per_position": attributed.tolist(),
                "per_component": per_component}
    return _step(study, study.path(task, "position_effect.json", modality), compute)


def _undefined(study: Study, task: str) -> str | None:
    """Why a task's circuits cannot be compared (F undefined in a modality), or None."""
    for m in task_defs.MODALITIES:
        run_curve(study, task, m)
        why = read_json(study.path(task, "curve.json", m)).get("undefined")
        if why:
            return why
    return None


def run_overlap(study: Study, task: str) -> dict:
    """nIoU of the textual and visual circuits per span; CI by resampling discovery pairs of both modalities."""
    def compute():
        why = _undefined(study, task)
        if why:  # n/a with the reason, never a number
            none = CI(float("nan"), float("nan"), float("nan")).as_dict()
            return {s: {"niou": none, "niou_heads": None, "niou_neurons": None, "iou_heads": None, "iou_neurons": None,
                        "niou_from": [], "niou_reason": why} for s in SPANS}
        text, image = (load_circuit(study, task, m) for m in ("text", "image"))
        point = overlap(text, image, niou_formula=study.method.niou)
        clipped = study.method.niou == "normalised"  # its unclipped value goes beside it (a point value)
        unclipped = overlap(text, image, niou_formula="unclipped") if clipped else None
        st, si = run_scores(study, task, "text"), run_scores(study, task, "image")
        ft, fi = (read_json(study.path(task, "curve.json", m))["circuit_fraction"] for m in ("text", "image"))
        sizes = (st.n_pairs, si.n_pairs)
        resampled = index_matrices(sizes, study.resamples)  # the bootstrap's own draws (seed 0)
        note = None
        if st.per_pair is None or si.per_pair is None:  # too large to keep every pair's scores: certified candidates
            st, si = (_candidate_scores(study, task, m, s, f, list(resampled[j]))
                      for j, (m, s, f) in enumerate((("text", st, ft), ("image", si, fi))))
            if st is None or si is None:
                note = "no interval: the candidate sets could not be certified for every resample"
        if not note:
            values = _resampled_niou(study, (st, si), (ft, fi), resampled)
            at_all = _resampled_niou(study, (st, si), (ft, fi), [np.arange(k)[None] for k in sizes])
        result = {}
        for s in SPANS:
            if note:
                ci = CI(point[s].niou, float("nan"), float("nan"))
            else:
                ci = interval(at_all[s][0], values[s])  # the point: the circuits of the mean over every pair
            units = [u for u in ("heads", "neurons") if np.isfinite(getattr(point[s], f"niou_{u}"))]
            result[s] = {"niou": ci.as_dict(), "niou_heads": point[s].niou_heads, "niou_neurons": point[s].niou_neurons,
                         "iou_heads": point[s].iou_heads, "iou_neurons": point[s].iou_neurons, "niou_from": units}
            if clipped:
                result[s]["niou_unclipped"] = unclipped[s].niou
            if len(units) < 2:  # the span's score falls back to one unit type (or none): say so in the record
                result[s]["niou_reason"] = (f"no {'head' if 'heads' not in units else 'neuron'} of either circuit is "
                                            f"in {s}: the score is the {units[0][:-1]} nIoU alone" if units else
                                            f"neither circuit has a node in {s}: nIoU is undefined")
        if note:
            result["note"] = note
        return result
    return _step(study, study.path(task, "overlap.json"), compute)


def _resampled_niou(study: Study, scores: tuple, fractions: tuple, idx: list) -> dict[str, np.ndarray]:
    """Per span, the (B,) nIoU of the textual and visual circuits of `scores` resampled by the rows of the index
    matrices idx (text, image), in blocks of resamples of at most about 64 MiB of scores."""
    nodes = sum(s.heads.numel() + s.neurons.numel() for s in scores)
    block = max(1, (64 << 20) // (4 * nodes))
    starts = tqdm(range(0, len(idx[0]), block), desc=f"nIoU resamples ({block} a block)", unit="block", leave=False,
                  disable=len(idx[0]) <= block)
    parts = [resampled_niou(*(Circuit.resampled(s, i[b:b + block], fraction=f) for s, i, f in zip(scores, idx, fractions)),
                            niou_formula=study.method.niou) for b in starts]
    return {s: np.concatenate([p[s] for p in parts]) for s in SPANS}


def _candidate_scores(study: Study, task: str, modality: str, scores: Scores, fraction: float, idx: list):
    """`scores` with per-pair values kept for a certified candidate set (circuits/candidates.py), by a second
    attribution pass over the discovery pairs that returns only those; None if no set could be certified."""
    discovery, _ = study.pairs(task, modality)
    for slack in (0.5, 0.25, 0.125):
        kept = candidates(scores, fraction, idx, slack)
        again = attribute(study.model, discovery, steps=study.steps, per_pair=kept,
                          head_score=study.method.head_score, interpolate=study.method.interpolate)
        scores.per_pair, scores.kept = again.per_pair, kept
        failed = certify(scores, fraction, idx)
        tqdm.write(f"{task}/{modality}: per-pair scores kept for {len(kept[0])} heads and {len(kept[1])} neurons "
                   f"(slack {slack}); {len(idx) - len(failed)}/{len(idx)} resamples certified")
        if not failed:
            return scores
    scores.per_pair = scores.kept = None
    return None


def run_interchange(study: Study, task: str, n_random: int = 5) -> dict:
    """Swap each span between the two circuits, both directions; score averaged over directions."""
    def compute():
        why = _undefined(study, task)
        if why:  # n/a with the reason, never a number
            none = CI(float("nan"), float("nan"), float("nan")).as_dict()
            return {s: {"score": none, "reason": why, **{f"{d}_{k}": v for d in ("visual", "text") for k, v in
                        (("score", None), ("f_original", None), ("f_swapped", None), ("f_random", [None]),
                         ("score_draws", [None]))}} for s in SPANS}
        text, image = (load_circuit(study, task, m) for m in ("text", "image"))
        ev_text, ev_image = study.pairs(task, "text")[1], study.pairs(task, "image")[1]
        result = {}
        for s in SPANS:
            both = interchange_both(study.model, text, image, ev_text, ev_image, s, n_random=n_random, seed=study.seed,
                                    draw=study.method.random_draw, aggregation=study.method.aggregation,
                                    resamples=study.resamples)
            result[s] = {"score": both.score.as_dict(),
                         **{f"{name}_{k}": v for name, r in (("visual", both.visual), ("text", both.text)) for k, v in
                            (("score", r.score), ("f_original", r.f_original), ("f_swapped", r.f_swapped),
                             ("f_random", r.f_random), ("score_draws", r.score_draws))}}
        return result
    return _step(study, study.path(task, "interchange.json"), compute)


def run_alignment(study: Study, task: str) -> dict:
    """Per layer, max cosine similarity of image-token residuals to the aligned textual data tokens."""
    def compute():
        image, text = study.candidates(task, "image"), study.candidates(task, "text")
        a = alignment(study.model, image, text, resamples=study.resamples)
        return {"per_layer": a.per_layer.tolist(), "ci": [c.as_dict() for c in a.ci], "n_prompts": len(a.per_prompt)}
    return _step(study, study.path(task, "alignment.json"), compute)


def run_backpatch(study: Study, task: str) -> dict:
    """Back-patching on visual prompts and, as control, on textual prompts; config chosen on a selection split.

    A model back-patching refuses (prefix-LM attention) gets a record of why, with every number undefined."""
    def compute():
        why = refusal(study.model)
        if why:
            none = CI(float("nan"), float("nan"), float("nan")).as_dict()
            row = {"config": None, "base": none, "patched": none, "gain_points": none, "n_selection": 0, "n_test": 0,
                   "selection": {}}
            tqdm.write(f"{task}: back-patching skipped: {why}")
            return {"skipped": why, "image": row, "text": dict(row)}
        result = {}
        for modality in ("image", "text"):
            r = backpatch(study.model, study.candidates(task, modality), resamples=study.resamples, seed=study.seed,
                          select_on=study.method.backpatch_selection)
            result[modality] = {"config": {"src": r.config[0], "dst": r.config[1], "window": r.config[2]},
                                "base": r.base.as_dict(), "patched": r.patched.as_dict(), "gain_points": r.gain.as_dict(),
                                "n_selection": r.n_selection, "n_test": r.n_test, "selection": r.selection,
                                "accuracy": r.accuracy}
        return result
    path = study.path(task, "backpatch.json")
    if path.exists() and "gain_points" not in read_json(path).get("image", {}):  # gains were fractions before
        path.unlink()
    return _step(study, path, compute)


def interchange_margin(record: dict) -> float:
    """The smaller denominator (`analyses.interchange.margin`) of the two directions of one span of interchange.json."""
    return min(margin(record[f"{d}_f_original"], record[f"{d}_f_random"]) for d in ("visual", "text"))


def interchange_readable(record: dict) -> bool:
    """Whether a span's two-direction score in interchange.json can be read: finite, both margins >= MIN_MARGIN."""
    return readable(record["score"]["value"], interchange_margin(record))


STEPS = {
    "accuracy": lambda s, t: [run_accuracy(s, t, m) for m in task_defs.MODALITIES],
    "curve": lambda s, t: [run_curve(s, t, m) for m in task_defs.MODALITIES],
    "position_effect": lambda s, t: [run_position_effect(s, t, m) for m in task_defs.MODALITIES],
    "overlap": run_overlap,
    "interchange": run_interchange,
    "alignment": run_alignment,
    "backpatch": run_backpatch,
}


#: The files a task's finished steps leave: per modality, then per task.
RECORDS = (("accuracy.json", "curve.json", "position_effect.json", "circuit.safetensors"),
           ("overlap.json", "interchange.json", "alignment.json", "backpatch.json"))


def recorded_tasks(folder: Path) -> tuple[list[str], list[str]]:
    """(complete, skipped): the tasks under `folder` (<out>/<model>/) with every step's record, whichever run wrote
    them, and those a run left out (skipped.json); built-in tasks first in their order, then by name."""
    names = sorted((p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda t: (task_defs.TASKS.index(t) if t in task_defs.TASKS else len(task_defs.TASKS), t)) \
        if Path(folder).is_dir() else []
    complete = [t for t in names if all((Path(folder) / t / m / f).is_file() for m in task_defs.MODALITIES
                                        for f in RECORDS[0]) and all((Path(folder) / t / f).is_file() for f in RECORDS[1])]
    skipped = [t for t in names if t not in complete and (Path(folder) / t / "skipped.json").is_file()]
    return complete, skipped


def run(study: Study, steps=tuple(STEPS)) -> list[str]:
    """Run `steps` for every task, skipping finished ones, with a progress bar; returns the completed tasks.

    A task the model answers too rarely to find a circuit is recorded in <task>/skipped.json and left out.
    """
    jobs = [(t, s) for t in study.tasks for s in steps]
    bar = tqdm(jobs, desc=f"study {study.model.name}")
    skipped = set()
    for task, step in bar:
        bar.set_postfix_str(f"{task}: {step}")
        if task in skipped:
            continue
        try:
            STEPS[step](study, task)
        except TooFewPairs as err:
            skipped.add(task)
            write_json(study.path(task, "skipped.json"), {"reason": str(err)})
            bar.write(f"skipping {task}: {err}")
    done = [t for t in study.tasks if t not in skipped]
    for task in done:  # a task left out by an earlier run (e.g. of a weaker model) is no longer
        study.path(task, "skipped.json").unlink(missing_ok=True)
    return done
