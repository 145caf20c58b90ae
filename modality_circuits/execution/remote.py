"""Remote execution on NDIF through nnsight: settings, the pre-flight check, the dry run, retries, checkpoints.

`remote` (on `load_model` and the `VLM`) is one of
  - False: run every trace here, on the loaded weights;
  - True: ship traces to the NDIF host configured in nnsight (`NDIF_HOST`, `nnsight.CONFIG.API.HOST`);
  - "http(s)://host[:port]": ship them to that host instead;
  - "local": nnsight's serialisation dry run. Every request is serialised exactly as it would be
    sent, deserialised with this package made unimportable (as on a server, which does not have
    it), executed against the loaded weights the way an NDIF server executes it, and only the
    values the request saves come back, through `torch.save` like a server's result.

THE REMOTE RULE. The functions marked `@server_body` (the `*_session` bodies of methods/ and
analyses/) are shipped to a server that does not have this package: their trace blocks may use
torch, nnsight, builtins, envoys, plain data and the helpers of execution/bodies.py, never another
function, class or constant object of this package, and they save only aggregated results.
execution/bodies.py (torch only) is registered with `nnsight.register`, so its functions travel with
every request by value (as source); `server_body` records each body and `check_server_body` (run over
all of them, and over the helpers, by the tests) names any other package object one reaches. Several traces go in
one request through an nnsight session (`VLM.chunks_per_request` chunks per request, the loop of
execution/requests.py), and each request is retried with exponential backoff when the connection
drops (`VLM.retries`, `VLM.retry_backoff`).
"""
from __future__ import annotations

import contextlib
import dis
import importlib.abc
import io
import linecache
import os
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import nnsight
import torch

from . import bodies

#: Modules whose functions travel with every request by value (their source), so a server runs them without this
#: package: registered with nnsight.register (cloudpickle's register_pickle_by_value, which nnsight's serialiser honours).
SHIPPED = (bodies,)
for _module in SHIPPED:
    nnsight.register(_module)

#: Root modules an NDIF server has installed (nnsight's own list for its local simulation).
SERVER_MODULES = frozenset({"torch", "numpy", "transformers", "accelerate", "diffusers", "einops", "peft", "nnsight"})
_PACKAGE = __name__.split(".")[0]
PING_TIMEOUT = 5.0  # seconds for the pre-flight reachability check


class RemoteUnavailable(RuntimeError):
    """Remote execution cannot start: no NDIF API key, or the host does not answer."""


def normalize(remote: Any) -> bool | str:
    """False, True, "local" or a host URL (without trailing slash); anything else is refused."""
    if remote is None or remote is False:
        return False
    if remote is True:
        return True
    if isinstance(remote, str):
        value = remote.strip()
        if value.lower() == "local":
            return "local"
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    raise ValueError(f"remote must be False, True, 'local' or an http(s):// host URL, got {remote!r}")


def is_hosted(remote: Any) -> bool:
    """Whether `remote` sends traces to a server (True or a host URL), as opposed to running them here."""
    return remote is True or (isinstance(remote, str) and remote != "local")


def host_of(remote: bool | str) -> str:
    """The host a hosted `remote` setting talks to: its URL, else NDIF_HOST / nnsight's configured host."""
    if isinstance(remote, str) and remote != "local":
        return remote
    from nnsight import CONFIG

    return (os.environ.get("NDIF_HOST") or CONFIG.API.HOST).rstrip("/")


def api_key() -> str | None:
    """The NDIF API key: NDIF_API_KEY, else nnsight's configuration (`nnsight.CONFIG.set_default_api_key`)."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def check(remote: Any, *, timeout: float = PING_TIMEOUT) -> bool | str:
    """Normalise `remote` and, for a hosted run, fail early: an API key must be set and the host must answer.

    The host check is one GET of `<host>/ping` with a short timeout, which an NDIF server answers with 200 "pong".
    Raises RemoteUnavailable with what to do; returns the normalised setting.
    """
    remote = normalize(remote)
    if not is_hosted(remote):
        return remote
    host = host_of(remote)
    if not host.startswith(("http://", "https://")):
        raise RemoteUnavailable(f"NDIF host {host!r} is not an http(s):// URL; set NDIF_HOST or pass remote='http://host:port'")
    if not api_key():
        raise RemoteUnavailable(
            f"remote execution on {host} needs an NDIF API key: set the NDIF_API_KEY environment variable "
            "or store one with `python -c \"import nnsight; nnsight.CONFIG.set_default_api_key('KEY')\"` "
            "(a local server without authentication accepts any value)"
        )
    import httpx

    try:
        response = httpx.get(f"{host}/ping", timeout=timeout)
    except httpx.HTTPError as err:
        raise RemoteUnavailable(
            f"NDIF host {host} is unreachable ({type(err).__name__}: {err or 'no answer'}; timeout {timeout:g}s); "
            "check the URL (NDIF_HOST, or remote='http://host:port') and that the server is up"
        ) from None
    if response.status_code >= 500:
        raise RemoteUnavailable(f"NDIF host {host} answered {response.status_code} to /ping: the service is down")
    if response.status_code != 200 or response.text.strip().strip('"') != "pong":  # NDIF: the JSON string "pong"
        raise RemoteUnavailable(f"{host} is not an NDIF server: it answered /ping with {response.status_code} "
                                f"{response.text.strip()[:60]!r}, not 200 \"pong\"; check the URL "
                                "(NDIF_HOST, or remote='http://host:port')")
    return remote


# --- the remote rule ---------------------------------------------------------------------------

#: Every function marked `@server_body`, by qualified name.
SERVER_BODIES: dict[str, Callable] = {}


def server_body(fn: Callable) -> Callable:
    """Mark `fn` as a body whose traces run on a server (see THE REMOTE RULE above); returns it unchanged."""
    SERVER_BODIES[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


def check_server_body(fn: Callable) -> list[str]:
    """Names `fn` (and the code nested in it) reads, as globals or closure variables, that resolve to an object
    of this package outside the SHIPPED modules: what a server could not deserialise."""
    closure = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))

    def names_read(code):
        for ins in dis.get_instructions(code):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF"):
                yield ins.opname, ins.argval
        for const in code.co_consts:
            if hasattr(const, "co_code"):
                yield from names_read(const)

    shipped = {module.__name__ for module in SHIPPED}
    found = set()
    for op, name in names_read(fn.__code__):
        obj = closure.get(name) if op == "LOAD_DEREF" else fn.__globals__.get(name)
        owner = getattr(obj, "__module__", None) or (obj.__name__ if isinstance(obj, type(sys)) else None)
        if isinstance(owner, str) and owner.split(".")[0] == _PACKAGE and owner not in shipped:
            found.add(name)
    return sorted(found)


# --- the dry run -------------------------------------------------------------------------------


class _RefuseImports(importlib.abc.MetaPathFinder):
    """Makes this package unimportable, as on a server that only has torch, transformers and nnsight."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == _PACKAGE:
            raise ModuleNotFoundError(f"No module named {name!r} (a remote server does not have it)", name=name)
        return None


@contextlib.contextmanager
def _as_on_a_server():
    """Hide every non-server module and refuse imports of this package (nnsight's LocalSimulationBackend, stricter)."""
    hidden, paths = {}, []
    for path in list(sys.path):
        if "site-packages" in path or "lib/python" in path:
            continue
        paths.append(path)
        sys.path.remove(path)
    for name in list(sys.modules):
        root = name.split(".")[0]
        if root in SERVER_MODULES or root in sys.stdlib_module_names or "nnsight" in name:
            continue
        hidden[name] = sys.modules.pop(name)
    blocker = _RefuseImports()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)
        sys.path.extend(paths)


@dataclass
class Exchange:
    """Sizes of one simulated request: the serialised payload and the result blob a server would send back."""

    request_bytes: int
    result_bytes: int
    saved: tuple[str, ...]


#: The last 1000 dry-run requests of this process, oldest first (tests read it to check what travels).
EXCHANGES: deque[Exchange] = deque(maxlen=1000)


class DryRunBackend:
    """remote="local": serialise the request, deserialise it as a server would, execute it there, return the saves.

    Unlike nnsight's LocalSimulationBackend (which validates the payload, then runs the caller's
    original block), this executes the *deserialised* block against the model, so the numbers
    come from what was shipped, and passes back only the values the block saved, round-tripped
    through torch.save as an NDIF server does. `server`: another nnsight model to run the request
    on (default: `model` itself), e.g. one rebuilt from `model.to_model_key()` with its weights,
    which is what an NDIF model actor holds.
    """

    def __init__(self, model, server=None) -> None:
        self.model = model
        self.server = model if server is None else server

    def __call__(self, tracer) -> None:
        # private nnsight internals (checked against nnsight 0.8.1): `_saves` (ids of saved values),
        # `inc`/`dec` (the trace-scope depth a server's execution runs in), `push` (values into the
        # caller's frame) and the model's `_remoteable_*` environment hooks, as nnsight's own
        # RemoteBackend and LocalSimulationBackend use them.
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc, save
        from nnsight.tracing.util import push

        pull_env()
        blob = RequestModel.serialize(tracer, compress=False)
        if self.server is not self.model:
            self.server._remoteable_set_env(self.model._remoteable_get_env())
        persistent = self.server._remoteable_persistent_objects()
        filename = tracer.info.frame.f_code.co_filename
        cached = linecache.cache.get(filename)
        try:
            with _as_on_a_server():
                restored = RequestModel.deserialize(blob, persistent, compress=False)
        finally:  # deserialize registers the block's source under the caller's file name: put the file back
            if cached is not None:
                linecache.cache[filename] = cached
            else:
                linecache.cache.pop(filename, None)
        inc()  # what the server does: run the block in a trace scope, collect what it saved by identity
        try:
            restored.execute(restored.info.code)
            saves = _saves()
            result = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in saves}
        finally:
            dec()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        EXCHANGES.append(Exchange(len(blob), buffer.tell(), tuple(result)))
        result = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
        for value in result.values():  # as nnsight's RemoteBackend: mark and push into the caller's frame
            save(value)
        push(tracer.info.frame, result)


def backend(nn, remote: bool | str):
    """The nnsight backend for a `remote` setting (None: run in place)."""
    if remote is False:
        return None
    if remote == "local":
        return DryRunBackend(nn)
    from nnsight.intervention.backends.remote import RemoteBackend

    # `_remoteable_get_env` is private nnsight (0.8.1): the environment a request declares to the server
    return RemoteBackend(nn.to_model_key(), host=host_of(remote), api_key=api_key(),
                         env=nn._remoteable_get_env(), blocking=True)


# --- retries -----------------------------------------------------------------------------------


def transient(err: BaseException) -> bool:
    """Whether a failed request is worth sending again: a dropped connection, a timeout, a 5xx/429 answer."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx

        if isinstance(err, httpx.TransportError):
            return True
        if isinstance(err, httpx.HTTPStatusError):
            return err.response.status_code >= 500 or err.response.status_code == 429
    except ImportError:  # pragma: no cover
        pass
    try:
        import websocket

        if isinstance(err, websocket.WebSocketException):
            return True
    except ImportError:  # pragma: no cover
        pass
    from nnsight.intervention.backends.remote import RemoteError

    if isinstance(err, RemoteError) and str(err).startswith("Failed to send request"):
        return err.__cause__ is None or transient(err.__cause__)
    return False


def call(model, fn: Callable, *args, **kwargs):
    """fn(model, *args, **kwargs), sent again after a transient failure when `model.remote` is set.

    Up to `model.retries` retries, waiting `model.retry_backoff` · 2^i seconds before retry i.
    Local runs (remote=False) call fn once: a failure there is not a network problem.
    """
    attempts = 1 + (model.retries if model.remote else 0)
    for attempt in range(attempts):
        try:
            return fn(model, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below
            if not transient(err):
                raise
            if attempt + 1 == attempts:  # a server error (e.g. HTTP 500) after every retry: one clear error
                raise RemoteUnavailable(f"the remote server failed {attempts} times ({type(err).__name__}: {err}); "
                                        "try again later, raise VLM.retries, or run without --remote") from err
            wait = model.retry_backoff * 2**attempt
            warnings.warn(f"remote request failed ({type(err).__name__}: {err}); retry {attempt + 1}/{model.retries} "
                          f"in {wait:g}s", RuntimeWarning, stacklevel=2)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
