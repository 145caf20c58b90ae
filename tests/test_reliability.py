"""Reliability: files handed to us run no code and are checked, numbers that overflowed stop the run where
they appear, bad data and bad names get one clear error."""
import json
import math
import os
import pickle
import stat
import threading
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
from conftest import get_tiny
from PIL import Image
from safetensors.torch import save_file

import modality_circuits
from modality_circuits import Circuit, Scores, load_model
from modality_circuits.analyses.alignment import alignment
from modality_circuits.analyses.backpatch import backpatch_logits
from modality_circuits.data.tasks import load_image_data
from modality_circuits.execution import remote
from modality_circuits.execution.store import atomic, nan_for_null, read_json, write_json
from modality_circuits.methods.ablation import ablation_lds, logit_diffs
from modality_circuits.tasks import build_pairs
from modality_circuits.testing import tiny_model


class _Marker:
    """Unpickling this would create the marker file: through os.system, or through open."""

    def __init__(self, path, via_system):
        self.path, self.via_system = str(path), via_system

    def __reduce__(self):
        if self.via_system:
            return os.system, (f"touch {self.path}",)
        return open, (self.path, "w")


def test_malicious_pickle_runs_nothing(tmp_path):
    model = get_tiny("llava")
    pairs = build_pairs("counting", "text", model, n=2)
    marker = tmp_path / "marker"
    payloads = [_Marker(marker, True), _Marker(marker, False)]
    for i, payload in enumerate(payloads):
        raw, zipped = tmp_path / f"raw{i}.ckpt", tmp_path / f"zip{i}.ckpt"
        raw.write_bytes(pickle.dumps(payload))
        torch.save(payload, zipped)  # torch's own file format around the same pickle
        for path in (raw, zipped):
            with pytest.raises(ValueError, match=str(path)):
                modality_circuits.attribute(model, pairs, steps=1, checkpoint=path, progress=False)
            with pytest.raises(ValueError, match=str(path)):
                Circuit.load(path)
            with pytest.raises(ValueError, match=str(path)):
                Scores.load(path)
    assert not marker.exists()


# --- non-finite numbers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model():
    """A tiny model with one nan weight (a fresh one: the shared tiny models stay clean)."""
    model = tiny_model("llava")
    name = next(n for n, _ in model.hf_model.named_parameters() if "layers.0.mlp.down_proj.weight" in n)
    with torch.no_grad():
        model.hf_model.get_parameter(name)[0, 0] = float("nan")
    return model


def test_a_nan_weight_stops_each_step_that_meets_it(nan_model):
    pairs = build_pairs("counting", "text", nan_model, n=2)
    with pytest.raises(FloatingPointError, match=r"^attribute: .*float32.*nan"):
        modality_circuits.attribute(nan_model, pairs, steps=2, progress=False)
    with pytest.raises(FloatingPointError, match="^logit_diffs: "):
        logit_diffs(nan_model, pairs)
    T, L = pairs[0].length, nan_model.n_layers
    circuit = Circuit(torch.ones(L, nan_model.n_heads, T, dtype=torch.bool),
                      torch.ones(L, nan_model.d_mlp, T, dtype=torch.bool), pairs[0].spans, nan_model.name)
    with pytest.raises(FloatingPointError, match="^ablation_lds: "):
        ablation_lds(nan_model, [circuit], pairs)
    with pytest.raises(FloatingPointError, match="^backpatch_logits: "):
        backpatch_logits(nan_model, pairs, [(1, 0, 1)])
    image = build_pairs("counting", "image", nan_model, n=2)
    with pytest.raises(FloatingPointError, match="^alignment: "):
        alignment(nan_model, image, pairs, resamples=10)


def test_float16_overflow_gets_the_dtype_hint():
    from modality_circuits.execution.checks import finite

    class Half:
        name, dtype = "m", torch.float16

    with pytest.raises(FloatingPointError, match="predict: 1 of 2 .*float16.*bfloat16"):
        finite(torch.tensor([1.0, float("inf")]), "predict", Half())
    assert finite(torch.ones(3), "predict", Half()).sum() == 3


def test_circuits_refuse_scores_that_are_not_finite():
    heads, neurons = torch.ones(2, 4, 5), torch.ones(2, 6, 5)
    heads[1, 2, 3] = float("nan")
    scores = Scores(heads, neurons, {"D": (0, 2), "Q": (2, 4), "G": (4, 5)}, "m", 3)
    with pytest.raises(FloatingPointError, match="from_scores"):
        Circuit.from_scores(scores, fraction=0.5)


# --- result files -------------------------------------------------------------------------------


def test_json_is_strict_and_null_reads_back_as_undefined(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": float("nan"), "b": [float("inf"), 1.5, -float("inf")], "c": np.float32("nan"),
                      "d": torch.tensor(2.5), "e": np.int64(3), "f": None, "g": "x", "h": True})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise AssertionError(f"bare {constant} in {text}")

    data = json.loads(text, parse_constant=refuse)
    assert data == {"a": None, "b": [None, 1.5, None], "c": None, "d": 2.5, "e": 3.0, "f": None, "g": "x", "h": True}
    back = nan_for_null(read_json(path))
    assert math.isnan(back["a"]) and math.isnan(back["b"][0]) and back["b"][1] == 1.5 and back["g"] == "x"


def test_results_get_an_ordinary_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic(tmp_path / "b.bin") as tmp:
            open(tmp, "wb").write(b"1")
        os.umask(0o027)
        write_json(tmp_path / "c.json", {"x": 1})
    finally:
        os.umask(old)
    modes = [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.json", "b.bin", "c.json")]
    assert modes == [0o644, 0o644, 0o640]


def _circuit_file(tmp_path):
    path = tmp_path / "c.safetensors"
    heads = torch.rand(2, 4, 30) > 0.5
    Circuit(heads, torch.rand(2, 6, 30) > 0.5, {"D": (0, 10), "Q": (10, 20), "G": (20, 30)}, "m").save(path)
    return path


def test_a_damaged_circuit_file_is_one_clear_error(tmp_path):
    path = _circuit_file(tmp_path)
    good = path.read_bytes()
    assert Circuit.load(path).heads.shape == (2, 4, 30)
    path.write_bytes(good[:-50] + bytes(50))  # the last 50 bytes overwritten: the tensors' data
    with pytest.raises(ValueError, match=f"{path} is damaged"):
        Circuit.load(path)
    for cut in (len(good) - 7, len(good) // 2, 5, 0):
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=f"{path} is unreadable or truncated.*expected a modality_circuits circ"):
            Circuit.load(path)
    save_file({"weight": torch.ones(3)}, path)  # another program's safetensors
    with pytest.raises(ValueError, match=f"{path} was not written by modality_circuits"):
        Circuit.load(path)
    save_file({"heads": torch.ones(3)}, path, metadata={"modality_circuits": "{not json"})
    with pytest.raises(ValueError, match=f"{path} has a garbled header"):
        Circuit.load(path)
    header = {"kind": "circuit", "spans": {}, "model": "m", "format_version": 1}  # no meta, no neurons tensor
    save_file({"heads": torch.ones(3, dtype=torch.uint8)}, path, metadata={"modality_circuits": json.dumps(header)})
    with pytest.raises(ValueError, match=f"{path} lacks neurons, meta"):
        Circuit.load(path)
    with pytest.raises(ValueError, match="holds circuit, not scores"):
        Scores.load(_circuit_file(tmp_path))


def test_files_without_a_checksum_are_still_read(tmp_path):
    path = _circuit_file(tmp_path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["modality_circuits"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del header["sha256"]
    save_file(tensors, path, metadata={"modality_circuits": json.dumps(header)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Circuit.load(path).heads.shape == (2, 4, 30)


# --- pairs and data -----------------------------------------------------------------------------


@pytest.mark.parametrize("task, distinct", [("factual_recall", 31), ("sentiment", 48)])
def test_build_pairs_returns_distinct_pairs_only(task, distinct, llava):
    from modality_circuits.data.pairs import prompt_key

    with pytest.warns(UserWarning, match=f"only {distinct} distinct pairs"):
        pairs = build_pairs(task, "text", llava, n=100)
    assert len(pairs) == distinct == len({prompt_key(p.prompt) for p in pairs})
    few = build_pairs(task, "text", llava, n=5)
    assert len(few) == 5 == len({prompt_key(p.prompt) for p in few})
    for n in (0, -1):
        with pytest.raises(ValueError, match="n must be at least 1"):
            build_pairs(task, "text", llava, n=n)


def _csv_dir(tmp_path, rows, *, header="item,question,answer,image", encoding="utf-8", images=True):
    if images:
        for name in {r[3] for r in rows if r[3]}:
            Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / name)
    lines = [header] + [",".join(r) for r in rows]
    (tmp_path / "factual_recall.csv").write_bytes("\n".join(lines).encode(encoding) + b"\n")
    return tmp_path


SPORT = "What sport does this person play?"
ROWS = [("Lionel Messi", SPORT, "football", "a.png"), ("Roger Federer", SPORT, "tennis", "b.png"),
        ("Tiger Woods", SPORT, "golf", "c.png")]


def test_an_answer_the_tokenizer_does_not_know_is_named(tmp_path, llava):
    folder = _csv_dir(tmp_path, ROWS + [("Babe Ruth", SPORT, "hockey", "d.png")])
    with pytest.raises(ValueError, match="does not know 'hockey'"):
        build_pairs("factual_recall", "text", llava, n=4, data_dir=folder)


def test_csv_data_errors_are_clear(tmp_path):
    load = lambda folder: load_image_data(folder, "factual_recall")  # noqa: E731
    cases = {
        "plain": (ROWS, {}, None),
        "bom": (ROWS, {"encoding": "utf-8-sig"}, None),
        "latin1": (ROWS + [("Frédéric Chopin", SPORT, "piano", "a.png")], {"encoding": "latin-1"}, "is not UTF-8"),
        "header_only": ([], {}, "has a header but no rows"),
        "no_image": (ROWS + [("Babe Ruth", SPORT, "baseball", "")], {}, r"line 5: empty image"),
        "no_answer": (ROWS + [("Babe Ruth", SPORT, "", "a.png")], {}, r"line 5: empty answer"),
    }
    for name, (rows, kw, message) in cases.items():
        (tmp_path / name).mkdir()
        folder = _csv_dir(tmp_path / name, rows, **kw)
        if message is None:
            assert len(load(folder)) == 3
        else:
            with pytest.raises(ValueError, match=message):
                load(folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "factual_recall.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load(tmp_path / "empty")
    (tmp_path / "twice").mkdir()
    with pytest.warns(UserWarning, match="dropped 2 repeated rows"):
        assert len(load(_csv_dir(tmp_path / "twice", ROWS + ROWS[:2]))) == 3


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_a_corrupt_image_is_named(damage, tmp_path, llava):
    folder = _csv_dir(tmp_path, ROWS)
    if damage == "truncated":
        Image.effect_noise((64, 64), 50).convert("RGB").save(folder / "b.png")
        (folder / "b.png").write_bytes((folder / "b.png").read_bytes()[:2000])
    else:
        (folder / "b.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"image \S*b\.png cannot be read"):
        build_pairs("factual_recall", "image", llava, n=3, data_dir=folder)


# --- analyses, names, hosts ---------------------------------------------------------------------


def test_alignment_refuses_swapped_or_same_modality_pairs(llava):
    from modality_circuits import alignment

    image = build_pairs("counting", "image", llava, n=2)
    text = build_pairs("counting", "text", llava, n=2)
    for args, message in (((text, image), "image_pairs must be image prompts, got text"),
                          ((text, text), "image_pairs must be image prompts"),
                          ((image, image), "text_pairs must be text prompts, got image"),
                          ((image, []), "text_pairs must be text prompts, got none")):
        with pytest.raises(ValueError, match=message):
            alignment(llava, *args, resamples=10)


@pytest.fixture
def no_hub(monkeypatch):
    """Any look-up of a config (local or on the Hub) fails the test."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("the name was looked up")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)


def test_bad_model_names_are_one_clear_error(no_hub, tmp_path):
    for name in ("qwen-7b", "not a model", "llama:3"):
        with pytest.raises(ValueError, match=r"unknown model .*short name \(qwen2-vl-7b, qwen, "):
            load_model(name)
    for path in (str(tmp_path / "missing"), "./nowhere", "~/nowhere/at/all", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_model(path)
    with pytest.raises(ValueError, match="unknown tiny family"):
        load_model("tiny-nothing")
    with pytest.raises(AssertionError, match="looked up"):  # a plausible hub id goes to the Hub
        load_model("someone/some-model")


def _serve(status: int, body: bytes):
    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status, body", [(200, b"<html>hello</html>"), (404, b"not found"), (401, b"")])
def test_a_host_that_is_not_ndif_is_refused(status, body, monkeypatch, no_hub):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    server = _serve(status, body)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(remote.RemoteUnavailable, match=f"{url} is not an NDIF server: it answered /ping with"):
            load_model("qwen", remote=url)
    finally:
        server.shutdown()
        server.server_close()
    server = _serve(200, b'"pong"')  # what an NDIF server answers
    try:
        assert remote.check(f"http://127.0.0.1:{server.server_port}") == f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
