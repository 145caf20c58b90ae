"""Remote execution (NDIF through nnsight): every algorithm gives the same numbers through nnsight's
serialisation dry run (remote="local") as locally; the checks before any work; retries and checkpoints.

No test contacts anything but 127.0.0.1.
"""
import dataclasses
import json
import socket
import threading
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from conftest import get_tiny
from safetensors import safe_open

from modality_circuits.analyses.alignment import alignment
from modality_circuits.analyses.backpatch import backpatch, backpatch_logits
from modality_circuits.analyses.interchange import interchange
from modality_circuits.circuits.circuit import Circuit
from modality_circuits.data.pairs import build_pairs
from modality_circuits.execution import remote
from modality_circuits.methods.ablation import faithfulness, faithfulness_curve, position_effect
from modality_circuits.methods.attribution import attribute
from modality_circuits.methods.patching import exact_patching
from modality_circuits.methods.predict import predictions
from modality_circuits.testing import FAMILIES
from modality_circuits.zoo import load_model

ATOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (conftest.one_thread) for every test of this module."""


def _same(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    else:
        assert a == pytest.approx(b, abs=ATOL, nan_ok=True)


def _both(model, fn):
    """fn on the local model and on its dry-run twin (same weights); asserts the dry run really went over the wire."""
    dry = model.with_remote("local")
    dry.chunks_per_request = model.chunks_per_request = 2  # several chunks per request, several requests
    n = len(remote.EXCHANGES)
    local, shipped = fn(model), fn(dry)
    assert len(remote.EXCHANGES) > n
    return local, shipped


def _suite(m, image, text, more):
    """Every algorithm on model m (the numbers that must not depend on where the traces run)."""
    T = image[0].length
    nodes = [("head", 0, 1, 3), ("neuron", 1, 5, T - 1), ("head", 1, m.n_heads - 1, T - 1), ("neuron", 0, 7, 2)]
    scores = attribute(m, image, steps=2, max_rows=3, per_pair=True, progress=False)  # 3 chunks, 2 requests
    circuit = Circuit.from_scores(scores, fraction=0.3)
    f = faithfulness(m, circuit, image)
    curve = faithfulness_curve(m, scores, image, fractions=[0.05, 0.1, 0.3, 0.6])
    swap = interchange(m, circuit, circuit, image, "Q", n_random=2, resamples=20)
    align = alignment(m, image, text, resamples=20)
    mechanics = {"allow_prefix_attention": m.adapter.attention == "prefix"}  # refused by default: test_families.py
    res = backpatch(m, image + more, configs=[(1, 0, 1), (1, 1, 1)], resamples=20, **mechanics)
    return [
        scores.heads, scores.neurons, *scores.per_pair,
        exact_patching(m, image, nodes, max_rows=6),  # 1 node per trace
        f.value, f.ld_circuit, f.ld_full, f.ld_empty,
        curve.values, curve.cpr, curve.cmd,
        swap.f_swapped, swap.f_random, swap.score,
        align.per_prompt,
        backpatch_logits(m, image, [(1, 0, 1), (0, 0, 1), (1, 1, 1)], max_rows=3, **mechanics),
        list(res.selection.values()), res.base.value, res.patched.value,
        predictions(m, image, "cf"),
        position_effect(m, image[:2]).per_position,
    ]


def _pairs(model):
    return (build_pairs("counting", "image", model, n=3, seed=0), build_pairs("counting", "text", model, n=3, seed=0),
            build_pairs("counting", "image", model, n=3, seed=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_algorithm_dry_run_equals_local(family):
    model = get_tiny(family)
    pairs = _pairs(model)
    local, shipped = _both(model, lambda m: _suite(m, *pairs))
    for a, b in zip(local, shipped, strict=True):
        _same(a, b)


def test_dry_run_refuses_trace_bodies_that_need_this_package():
    """The dry run deserialises as a server would: a body calling a helper of this package cannot run there."""
    import nnsight

    from modality_circuits.data.pairs import batch
    from modality_circuits.methods.ablation import pack

    dry = get_tiny("llava").with_remote("local")
    pair = build_pairs("counting", "text", dry, n=1)[0]
    root = dry.nn
    with pytest.raises(ModuleNotFoundError, match="modality_circuits"):
        with dry.trace(batch([pair.inputs])):
            ld = nnsight.save(pack(root.output.logits[:, -1] > 0))
    with dry.trace(batch([pair.inputs])):
        ld = nnsight.save(root.output.logits[:, -1].sum())
    assert torch.isfinite(ld)


def test_only_aggregates_come_back():
    model = get_tiny("llava")
    dry = model.with_remote("local")
    image = build_pairs("counting", "image", model, n=3, seed=0)
    text = build_pairs("counting", "text", model, n=3, seed=0)
    L, P, d = model.n_layers, len(image), model.hf_model.config.text_config.hidden_size
    n_img = image[0].spans["D"][1] - image[0].spans["D"][0]
    residual_cache = L * P * n_img * d * 4  # what backpatch and alignment would otherwise send back

    remote.EXCHANGES.clear()
    scores = attribute(dry, image, steps=2, progress=False)
    size = 2 * (scores.heads.numel() + scores.neurons.numel()) * 4
    assert all(e.result_bytes < size + 4096 for e in remote.EXCHANGES)  # the sums and square sums, not per-pair scores
    remote.EXCHANGES.clear()
    alignment(dry, image, text, resamples=10)
    assert [e.result_bytes < P * L * 4 + 4096 < residual_cache for e in remote.EXCHANGES] == [True]
    remote.EXCHANGES.clear()
    ids = torch.tensor([image[0].answer_id, image[0].cf_answer_id])
    logits = backpatch_logits(dry, image, [(1, 0, 1), (0, 0, 1)], ids=ids)
    assert logits.shape == (2, P, 2)
    assert len(remote.EXCHANGES) == 1 and remote.EXCHANGES[0].result_bytes < residual_cache  # cache stays server-side
    torch.testing.assert_close(logits, backpatch_logits(model, image, [(1, 0, 1), (0, 0, 1)])[..., ids], atol=0, rtol=0)


def test_dropped_requests_are_sent_again(monkeypatch):
    model = get_tiny("llava")
    dry = model.with_remote("local")
    dry.retry_backoff, dry.chunks_per_request = 0.0, 1
    pairs = build_pairs("counting", "text", model, n=3, seed=0)
    calls = []
    real = remote.DryRunBackend.__call__

    def flaky(self, tracer):  # every first attempt of a request drops
        calls.append(1)
        if len(calls) % 2:
            raise ConnectionResetError("connection dropped")
        return real(self, tracer)

    monkeypatch.setattr(remote.DryRunBackend, "__call__", flaky)
    with pytest.warns(RuntimeWarning, match="retry 1/3"):
        got = attribute(dry, pairs, steps=1, max_rows=2, progress=False)  # 3 chunks, 3 requests
    assert len(calls) == 6
    want = attribute(model, pairs, steps=1, max_rows=2, progress=False)
    torch.testing.assert_close(got.heads, want.heads, atol=0, rtol=0)
    torch.testing.assert_close(got.neurons, want.neurons, atol=0, rtol=0)

    def broken(self, tracer):  # an error in the request itself is not retried
        calls.append(1)
        raise ValueError("bad intervention")

    calls.clear()
    monkeypatch.setattr(remote.DryRunBackend, "__call__", broken)
    with pytest.raises(ValueError, match="bad intervention"):
        attribute(dry, pairs, steps=1, progress=False)
    assert len(calls) == 1


def test_attribution_checkpoint_resumes(tmp_path, monkeypatch):
    model = get_tiny("qwen2_vl")
    dry = model.with_remote("local")
    dry.retries, dry.chunks_per_request = 0, 1
    pairs = build_pairs("counting", "image", model, n=4, seed=0)
    path = tmp_path / "ig.ckpt"
    calls = []
    real = remote.DryRunBackend.__call__

    def dies_third(self, tracer):
        calls.append(1)
        if len(calls) == 3:
            raise ConnectionAbortedError("server went away")
        return real(self, tracer)

    monkeypatch.setattr(remote.DryRunBackend, "__call__", dies_third)
    with pytest.raises(remote.RemoteUnavailable, match="server went away"):  # a dropped connection, no retry left
        attribute(dry, pairs, steps=1, max_rows=2, progress=False, checkpoint=path)  # 4 chunks of 1 pair
    with safe_open(str(path), "pt") as f:  # a safetensors file: its JSON header counts the pairs done
        assert json.loads(f.metadata()["modality_circuits_checkpoint"])["numbers"]["done"] == 2
    calls.clear()
    resumed = attribute(dry, pairs, steps=1, max_rows=2, progress=False, checkpoint=path)
    assert len(calls) == 2  # only the chunks not yet done
    want = attribute(model, pairs, steps=1, max_rows=2, progress=False)
    torch.testing.assert_close(resumed.heads, want.heads, atol=0, rtol=0)
    torch.testing.assert_close(resumed.neurons, want.neurons, atol=0, rtol=0)
    calls.clear()
    again = attribute(dry, pairs, steps=1, max_rows=2, progress=False, checkpoint=path)
    assert not calls and torch.equal(again.heads, want.heads)
    with pytest.warns(RuntimeWarning, match="another run"):  # other pairs: the file is not reused
        attribute(dry, pairs[:2], steps=1, max_rows=2, progress=False, checkpoint=path)


# --- settings and the checks before any work ---------------------------------------------------


def test_remote_settings():
    assert remote.normalize(False) is False and remote.normalize(None) is False
    assert remote.normalize(True) is True and remote.normalize("local") == "local"
    assert remote.normalize("http://127.0.0.1:8001/") == "http://127.0.0.1:8001"
    for bad in ("ndif", "ftp://x", 3):
        with pytest.raises(ValueError, match="remote must be"):
            remote.normalize(bad)
    model = load_model("tiny-llava", remote="local")
    assert model.remote == "local" and not model.hosted
    assert model.with_remote(False).remote is False and model.with_remote(False).nn is model.nn


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_work(monkeypatch):
    """Loading anything fails the test: the checks must come first."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("work started before the remote checks")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)


def test_missing_key_fails_before_any_work(monkeypatch, no_work):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{_closed_port()}")
    for setting in (True, f"http://127.0.0.1:{_closed_port()}"):
        with pytest.raises(remote.RemoteUnavailable, match="NDIF_API_KEY"):
            load_model("qwen", remote=setting)


def test_unreachable_host_fails_before_any_work(monkeypatch, no_work):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(remote.RemoteUnavailable, match="unreachable"):
        load_model("qwen", remote=url)
    monkeypatch.setenv("NDIF_HOST", url)  # remote=True: the configured host
    with pytest.raises(remote.RemoteUnavailable, match=f"{url} is unreachable"):
        load_model("qwen", remote=True)


@pytest.fixture
def ping_server():
    class Ping(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ping" else 404)
            self.end_headers()
            self.wfile.write(b'"pong"')  # as an NDIF server: the JSON string "pong"

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Ping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_hosted_model_is_named_by_id_and_runs_on_the_model_its_key_rebuilds(family, tmp_path, monkeypatch, ping_server):
    """remote=URL: a weightless nnsight TransformersModel keyed by the checkpoint id, same envoy paths as locally;
    its requests, run on the model a server rebuilds from that key, give the local numbers."""
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    tiny = get_tiny(family)
    path = tmp_path / family
    tiny.hf_model.save_pretrained(path)
    if hasattr(tiny.processor, "save_pretrained"):
        tiny.processor.save_pretrained(path)
    else:  # MiniProcessor: its parts
        tiny.processor.tokenizer.save_pretrained(path)
        tiny.processor.image_processor.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hosted = load_model(str(path), remote=ping_server)
    assert hosted.hosted and hosted.remote == ping_server and hosted.device == torch.device("cpu")
    assert (hosted.n_layers, hosted.n_heads, hosted.d_mlp, hosted.image_token_ids) == \
           (tiny.n_layers, tiny.n_heads, tiny.d_mlp, tiny.image_token_ids)

    def paths(m):
        return [e.path for layer in m.layers() for e in (layer, m.head_site(layer), m.neuron_site(layer))] + [m.nn.path]

    assert paths(hosted) == paths(tiny)
    key = hosted.nn.to_model_key()
    assert key.startswith("nnsight.modeling.transformers.TransformersModel:")
    assert str(path) in key and '"task": "image-text-to-text"' in key
    backend = hosted.backend()
    assert type(backend).__name__ == "RemoteBackend" and backend.host == ping_server and backend.api_key == "test-key"

    # an NDIF model actor in this process: the model rebuilt from the key with its weights, running the requests
    from nnsight.modeling.mixins.remotable import Remotable

    server = Remotable.from_model_key(key, dispatch=True, dtype=torch.float32, processor=hosted.processor)
    server._module.requires_grad_(False)  # as NDIF's model actors hold them: frozen
    monkeypatch.setattr(remote, "backend", lambda nn, setting: remote.DryRunBackend(nn, server=server))
    hosted.chunks_per_request = tiny.chunks_per_request = 2
    pairs = _pairs(tiny)
    n = len(remote.EXCHANGES)
    for a, b in zip(_suite(tiny, *pairs), _suite(hosted, *pairs), strict=True):
        _same(a, b)
    assert len(remote.EXCHANGES) > n
    with pytest.raises(ValueError, match="without weights"):
        hosted.with_remote("local")
    with pytest.raises(ValueError, match="no server can host"):  # an in-memory model has no id
        tiny.with_remote(ping_server)
    with pytest.raises(ValueError, match="loaded locally"):
        dataclasses.replace(tiny, remote=ping_server).backend()


def test_cli_remote_local_writes_the_local_scores(tmp_path):
    from modality_circuits.circuits.circuit import Scores
    from modality_circuits.study import cli

    args = ["discover", "--model", "tiny-llava", "--task", "counting", "--modality", "text", "--n", "4",
            "--all-prompts", "--steps", "1"]
    n = len(remote.EXCHANGES)
    cli.main(args + ["--out", str(tmp_path / "here")])
    assert len(remote.EXCHANGES) == n
    cli.main(args + ["--out", str(tmp_path / "shipped"), "--remote", "local"])
    assert len(remote.EXCHANGES) > n
    here, shipped = (Scores.load(next((tmp_path / d).rglob("scores.safetensors"))) for d in ("here", "shipped"))
    torch.testing.assert_close(here.heads, shipped.heads, atol=0, rtol=0)
    torch.testing.assert_close(here.neurons, shipped.neurons, atol=0, rtol=0)
