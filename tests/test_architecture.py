"""The package's house rules, checked from its source: layered imports without cycles, family facts only
in the adapter table and the zoo, and server bodies that reference nothing of this package."""
import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import modality_circuits
from modality_circuits.execution import remote
from modality_circuits.model import ADAPTERS

PACKAGE = Path(modality_circuits.__file__).parent
# Each role subpackage imports only from lower ranks (or itself); the top-level facades may import anything.
RANK = {"execution": 0, "model": 1, "data": 1, "circuits": 1, "zoo": 2, "methods": 3, "analyses": 4, "study": 5}


def _modules() -> dict[str, Path]:
    return {".".join(("modality_circuits", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Package modules imported anywhere in `path` (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (base[: len(base) - node.level + 1] if node.level else []) + (node.module.split(".") if node.module else [])
            target = ".".join(parts)
            for alias in node.names:  # `from . import x` may name a submodule
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


MODULES = _modules()
GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _role(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[-1] in RANK else None


def test_imports_follow_the_layers():
    wrong = [(m, t) for m, targets in GRAPH.items() for t in targets
             if _role(m) and _role(t) and _role(t) != _role(m) and RANK[_role(t)] >= RANK[_role(m)]]
    assert not wrong, f"imports against the layer order {RANK}: {wrong}"


def test_no_import_cycle():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in GRAPH[m]:
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in GRAPH:
        if m not in state:
            visit(m)


def test_family_names_only_in_the_adapter_table_and_the_zoo():
    allowed = {"modality_circuits.model.adapters"} | {m for m in MODULES if _role(m) == "zoo"}
    families = set(ADAPTERS) | {f.split("_")[0] for f in ADAPTERS} | {"qwen", "gemma", "mistral"}
    hits = [(m, f) for m, path in MODULES.items() if m not in allowed
            for f in families if f in path.read_text()]
    assert not hits, f"family names outside the adapter table and the zoo: {hits}"


def _all_bodies():
    for info in pkgutil.walk_packages(modality_circuits.__path__, "modality_circuits."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    return remote.SERVER_BODIES


def test_every_trace_body_is_marked_and_references_nothing_of_the_package():
    bodies = _all_bodies()
    assert len(bodies) >= 7  # IG, LD, ablation, exact patching, logits, alignment, back-patching
    for name, fn in bodies.items():
        assert not remote.check_server_body(fn), f"{name} reads package objects {remote.check_server_body(fn)}"
    # every function that opens a session or trace on the model's wrapper is a marked body
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(n, ast.Attribute) and n.attr in ("session", "trace") and isinstance(n.value, ast.Name)
                    and n.value.id in ("model", "root") for n in ast.walk(node)):
                shipped = module in {m.__name__ for m in remote.SHIPPED}  # helpers the bodies call, shipped with them
                assert f"{module}.{node.name}" in bodies or shipped or module.endswith(("model.vlm", "execution.remote")), \
                    f"{module}.{node.name} opens a trace but is not marked @server_body"


def test_shipped_helpers_are_torch_only():
    """The helpers shipped by value (execution/bodies.py) import only torch and reach nothing else of the package."""
    for module in remote.SHIPPED:
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] if node.level == 0 else "." for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert imported <= {"torch", "__future__"}, f"{module.__name__} imports {sorted(imported)}"
        functions = [f for f in vars(module).values() if inspect.isfunction(f) and f.__module__ == module.__name__]
        assert len(functions) >= 4
        for fn in functions:
            assert not remote.check_server_body(fn), f"{fn.__name__} reads {remote.check_server_body(fn)}"


def test_a_body_that_calls_a_package_helper_is_caught():
    from modality_circuits.methods.ablation import pack  # a package helper a body must not call

    def bad(model, chunks):
        with model.session():
            return pack(chunks)

    def good(model, chunks):
        import torch
        with model.session():
            return torch.cat(chunks)

    assert remote.check_server_body(remote.server_body(bad)) == ["pack"]
    assert remote.check_server_body(good) == []
    remote.SERVER_BODIES.pop(f"{bad.__module__}.{bad.__qualname__}")


@pytest.mark.parametrize("name", ["load_model", "attribute", "exact_patching", "faithfulness", "faithfulness_curve",
                                  "position_effect", "Circuit", "Scores", "Pair", "logit_diffs", "overlap",
                                  "interchange", "alignment", "backpatch", "keep_correct", "split"])
def test_public_api(name):
    assert callable(getattr(modality_circuits, name))


def test_public_modules():
    from modality_circuits.tasks import build_pairs
    from modality_circuits.testing import FAMILIES, tiny_model

    assert callable(build_pairs) and callable(tiny_model) and set(FAMILIES) == set(ADAPTERS)
