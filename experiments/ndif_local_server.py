"""Run every algorithm on an NDIF server and next to it locally, and print both.

    python experiments/ndif_local_server.py --model MODEL [MODEL ...] [--host http://127.0.0.1:8001] [--json FILE]

MODEL is what the server hosts, named as the client names it: a hub id, or a folder path that the
server can read at the same path (a server on this machine). To get such a folder from a tiny
test model (random weights, our chat template and processor):

    python experiments/ndif_local_server.py --save-tiny llava /tmp/tiny-llava     # writes the folder and exits
    python experiments/ndif_local_server.py --model /tmp/tiny-llava --wording toy --host http://127.0.0.1:8001

A tiny model's tokenizer knows only the toy wording's words, hence --wording toy for its folder (and for a copy
of the toy's folder); "tiny-<family>" and "toy" by name get it by default.

llava and gemma3 folders carry a transformers processor a server loads as is; the Qwen2-VL,
Pixtral and Mistral-3 tiny models use this package's torchvision-free processor, so their folders
hold the tokenizer and image processor only (a server then needs torchvision to build the
processor its pipeline wants).

The local run loads the same weights here. With --host local the "server" is nnsight's
serialisation dry run (no server needed: a check of the script itself, run by the tests:
`--model tiny-llava --host local --n 2 --steps 1`). The API key comes from
NDIF_API_KEY or nnsight's configuration; for a loopback host without one the script uses "local"
(an NDIF server without a database does no authentication). A local folder sets HF_HUB_OFFLINE so
nothing contacts the Hub. Both sides must hold the weights in the same dtype for equal numbers
(NDIF's default is bfloat16; NDIF_DEFAULT_DTYPE=float32 on the server matches a float32 folder).
Exit status 1 when a remote run fails or differs from the local one by more than --tol.
--json writes every row (and each --note KEY=VALUE) to FILE: experiments/ndif/serve.sh e2e makes
results/ndif/e2e.json this way.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]


def _shown(text: str) -> str:
    """`text` with this repository's absolute path written as "." (records that can be committed)."""
    return text.replace(str(ROOT), ".")


def save_tiny(family: str, folder: str) -> None:
    """A tiny random model of `family` as a folder a server can load (weights, config, processor)."""
    from modality_circuits.testing import tiny_model

    model = tiny_model(family)
    out = Path(folder)
    model.hf_model.save_pretrained(out)
    if hasattr(model.processor, "save_pretrained"):
        model.processor.save_pretrained(out)
    else:  # MiniProcessor: its parts, which load_processor reassembles here
        model.processor.tokenizer.save_pretrained(out)
        model.processor.image_processor.save_pretrained(out)
        print(f"note: {family} uses modality_circuits' processor; a server needs torchvision to build its own")
    print(f"saved tiny-{family} to {out.resolve()}; serve that path and pass --model {out.resolve()} --wording toy")


def _diff(a, b) -> float:
    """Largest absolute difference of two results (inf when their shapes differ)."""
    import torch

    if isinstance(a, dict):
        a, b = list(a.values()), list(b.values())
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return (a - b).abs().max().item() if a.shape == b.shape else float("inf")


def _short(x) -> str:
    import torch

    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {v:.3f}" for k, v in list(x.items())[:3]) + (", ..." if len(x) > 3 else "") + "}"
    if torch.is_tensor(x) and x.numel() > 1:
        return f"{tuple(x.shape)} mean {x.float().mean().item():+.4g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(f"{v:.3f}" for v in x[:4]) + (", ..." if len(x) > 4 else "") + "]"
    return f"{float(x):.4g}"


def compare(model_name: str, host: str, args) -> dict:
    """Every algorithm on `model_name` locally and through `host`; prints a table, returns the record."""
    import torch

    from modality_circuits.analyses.alignment import alignment
    from modality_circuits.analyses.backpatch import backpatch, backpatch_logits
    from modality_circuits.analyses.interchange import interchange
    from modality_circuits.circuits.circuit import Circuit
    from modality_circuits.data.pairs import build_pairs
    from modality_circuits.execution.remote import RemoteUnavailable
    from modality_circuits.methods.ablation import faithfulness, faithfulness_curve
    from modality_circuits.methods.attribution import attribute
    from modality_circuits.methods.patching import exact_patching
    from modality_circuits.methods.predict import predictions
    from modality_circuits.zoo import load_model

    began = time.perf_counter()
    try:  # the remote side first: a missing key or a dead host fails before anything is loaded
        remote = load_model(model_name, remote=host, wording=args.wording) if host != "local" else None
    except RemoteUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    local = load_model(model_name, dtype=getattr(torch, args.dtype) if args.dtype else None, wording=args.wording)
    remote = remote or local.with_remote("local")
    for m in (local, remote):
        m.chunks_per_request = args.chunks_per_request
    where = "nnsight's dry run" if host == "local" else host
    print(f"model {model_name} ({local.adapter.family}, {local.n_layers} layers); remote: {where}"
          + (f"; key {remote.nn.to_model_key()}" if host != "local" else ""))

    image = build_pairs(args.task, "image", local, n=args.n, seed=0)
    text = build_pairs(args.task, "text", local, n=args.n, seed=0)
    extra = build_pairs(args.task, "image", local, n=args.n, seed=1)
    T, L = image[0].length, local.n_layers
    nodes = [("head", l, 0, t) for l in range(L) for t in (image[0].spans["Q"][0], T - 1)] + \
            [("neuron", L - 1, 0, T - 1)]
    shared = {}

    def circuit(m):
        if "circuit" not in shared:
            shared["scores"] = attribute(local, image, steps=args.steps, progress=False)
            shared["circuit"] = Circuit.from_scores(shared["scores"], fraction=0.3)
        return shared["circuit"]

    runs = [
        ("predictions (P, V)", lambda m: predictions(m, image)),
        (f"attribute k={args.steps}: heads", lambda m: attribute(m, image, steps=args.steps, progress=False).heads),
        ("exact patching", lambda m: exact_patching(m, image, nodes)),
        ("faithfulness F", lambda m: faithfulness(m, circuit(m), image).value),
        ("faithfulness curve", lambda m: faithfulness_curve(m, shared["scores"], image, fractions=[0.01, 0.05, 0.1, 0.3]).values),
        ("interchange Q score", lambda m: interchange(m, circuit(m), circuit(m), image, "Q", n_random=2, resamples=50).score),
        ("alignment per layer", lambda m: alignment(m, image, text, resamples=50).per_layer),
        ("backpatch logits", lambda m: backpatch_logits(m, image, [(L - 1, 0, 1), (L - 1, L - 2, 1)])),
        ("backpatch selection", lambda m: backpatch(m, image + extra, configs=[(L - 1, 0, 1), (L - 1, L - 2, 1)],
                                                    resamples=50).selection),
    ]
    print(f"{'algorithm':26} {'local':>28} {'remote':>28} {'max|diff|':>10} {'local s':>8} {'remote s':>8}")
    rows = []
    for name, fn in runs:
        t0 = time.perf_counter()
        a = fn(local)
        t1 = time.perf_counter()
        row = {"algorithm": name, "local_s": round(t1 - t0, 3)}
        try:
            b = fn(remote)
        except Exception as err:  # noqa: BLE001 - report and go on with the next algorithm
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(f"{name:26} {_short(a):>28}   REMOTE FAILED: {row['error']}")
        else:
            t2 = time.perf_counter()
            diff = _diff(a, b)
            row.update(max_abs_diff=diff if diff != float("inf") else None, remote_s=round(t2 - t1, 3))
            if not diff <= args.tol:
                row["error"] = "shapes differ" if diff == float("inf") else f"differs by {diff:.3g} > {args.tol:g}"
            print(f"{name:26} {_short(a):>28} {_short(b):>28} {diff:10.3g} {t1 - t0:8.2f} {t2 - t1:8.2f}"
                  + ("   DIFFERS" if "error" in row else ""))
        rows.append(row)
    return {"model": _shown(model_name), "family": local.adapter.family, "layers": local.n_layers, "rows": rows,
            "failed": sum("error" in r for r in rows), "seconds": round(time.perf_counter() - began, 1)}


def _versions(*packages: str) -> dict:
    found = {}
    for p in packages:
        try:
            found[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            found[p] = None
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("NDIF_HOST", "http://127.0.0.1:8001"),
                        help="NDIF host URL, or 'local' for nnsight's serialisation dry run (default: $NDIF_HOST or %(default)s)")
    parser.add_argument("--model", nargs="+", help="hub ids or folders the server hosts ('toy': the embedded model)")
    parser.add_argument("--save-tiny", nargs=2, metavar=("FAMILY", "FOLDER"), help="write a tiny model folder and exit")
    parser.add_argument("--task", default="counting")
    parser.add_argument("--wording", default=None,
                        help="prompt wording, study or toy: toy for a saved tiny model's folder (default: the model's own)")
    parser.add_argument("--n", type=int, default=4, help="pairs per modality")
    parser.add_argument("--steps", type=int, default=2, help="integrated-gradient steps")
    parser.add_argument("--chunks-per-request", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="dtype of the local weights (default: the checkpoint's)")
    parser.add_argument("--tol", type=float, default=1e-5, help="largest local-vs-remote difference that passes")
    parser.add_argument("--json", help="write the rows of every model to this file")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE", help="add to the --json record")
    parser.add_argument("--verbose", action="store_true", help="show nnsight's status line of every remote job")
    args = parser.parse_args(argv)
    if args.save_tiny:
        save_tiny(*args.save_tiny)
        return 0
    if not args.model:
        parser.error("--model is required (or --save-tiny FAMILY FOLDER)")
    notes = {k: int(v) if v.isdigit() else v for k, v in (n.split("=", 1) for n in args.note if "=" in n)}
    if len(notes) != len(args.note):
        parser.error("--note takes KEY=VALUE")

    names = []
    for name in args.model:
        if os.path.isdir(name):
            name = str(Path(name).resolve())  # the key names the folder; the server reads the same path
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        names.append(name)
    host = args.host
    if host != "local" and not os.environ.get("NDIF_API_KEY"):
        from nnsight import CONFIG

        if not CONFIG.API.APIKEY and urlparse(host).hostname in ("127.0.0.1", "localhost", "::1"):
            os.environ["NDIF_API_KEY"] = "local"
            print("note: no NDIF API key set; using 'local' for the loopback server")

    import nnsight

    from modality_circuits.execution.remote import RemoteUnavailable

    nnsight.CONFIG.APP.REMOTE_LOGGING = args.verbose
    began = time.perf_counter()
    records = []
    for name in names:
        try:  # the remote side first: a missing key or a dead host fails before anything is loaded
            records.append(compare(name, host, args))
        except RemoteUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    failed = sum(r["failed"] for r in records)
    if args.json:
        from modality_circuits.execution.store import write_json

        write_json(args.json, {
            "command": _shown("python experiments/ndif_local_server.py " + " ".join(argv if argv is not None else sys.argv[1:])),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": host, "tol": args.tol, "failed": failed,
            "max_abs_diff": max((r.get("max_abs_diff") or 0.0 for rec in records for r in rec["rows"]), default=0.0),
            "seconds": round(time.perf_counter() - began, 1),
            "client": {"python": platform.python_version(), **_versions("torch", "transformers", "nnsight")},
            **notes, "models": records,
        })
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
