"""The documentation stays inside the repository and matches the code that cites it.

- every relative Markdown link in README.md and docs/*.md names an existing file of the repository
  (no `../` link: a clone has nothing outside the repository);
- every "docs/method.md section N" (or "sections N-M", "sections N, M") in the package and the
  experiments names a section that docs/method.md has.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docs_numbers", ROOT / "scripts" / "docs_numbers.py")
docs_numbers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_numbers)
METHOD = ROOT / "docs" / "method.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" may follow)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# "docs/method.md section 3", "docs/method.md sections 4-5", "docs/method.md sections 1, 3, 4, 8"
CITATION = re.compile(r"docs/method\.md,?\s+sections?\s+(\d+(?:\s*(?:[-–]|,|and)\s*\d+)*)")
HEADING = re.compile(r"^##\s+(\d+)\.\s", re.MULTILINE)


def _code_blocks_removed(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links (line numbers kept)."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _leaves(target: str) -> bool:
    return target.startswith("../") or target.startswith("/")


def _links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link of a Markdown file (URLs, mail and in-page anchors left out)."""
    out = []
    for number, line in enumerate(_code_blocks_removed(path.read_text()).splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue
            out.append((number, target))
    return out


def _sections() -> set[int]:
    return {int(n) for n in HEADING.findall(METHOD.read_text())}


def _cited(numbers: str) -> set[int]:
    """Section numbers of one citation: "4-5" -> {4, 5}; "1, 3, 4, 8" -> {1, 3, 4, 8}."""
    out = set()
    for part in re.split(r"\s*(?:,|and)\s*", numbers):
        ends = [int(x) for x in re.split(r"\s*[-–]\s*", part)]
        out.update(range(ends[0], ends[-1] + 1))
    return out


def test_method_document_exists_with_numbered_sections():
    assert METHOD.exists(), "docs/method.md is missing"
    assert _sections() >= set(range(1, 13)), f"docs/method.md sections found: {sorted(_sections())}"


def test_docs_link_nothing_outside_the_repository():
    """No `../` link: README.md and docs/*.md must not point outside the clone (e.g. ../shared/METHOD.md)."""
    outside = [f"{path.relative_to(ROOT)}:{line}: {target}" for path in DOCS for line, target in _links(path)
               if _leaves(target)]
    assert not outside, "links leaving the repository:\n" + "\n".join(outside)


def test_relative_links_resolve_to_files_in_the_repository():
    broken = []
    for path in DOCS:
        for line, target in _links(path):
            file = target.split("#", 1)[0]
            if not file or _leaves(target):  # `../` and absolute links: the test above
                continue
            resolved = (path.parent / file).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not broken, "links to missing files or outside the repository:\n" + "\n".join(broken)


@pytest.mark.parametrize("folder", ["modality_circuits", "experiments"])
def test_method_citations_name_existing_sections(folder):
    sections = _sections()
    cited, missing = 0, []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for numbers in CITATION.findall(line):
                cited += 1
                for n in sorted(_cited(numbers) - sections):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: section {n}")
    assert not missing, "citations of sections docs/method.md does not have:\n" + "\n".join(missing)
    if folder == "modality_circuits":
        assert cited, "the package cites no section of docs/method.md"


def test_no_citation_of_the_outside_specification():
    """The package points to docs/method.md, not to METHOD.md, which a clone does not have."""
    stale = [f"{path.relative_to(ROOT)}:{number}" for folder in ("modality_circuits", "experiments")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if "METHOD.md" in line]
    assert not stale, "still citing METHOD.md:\n" + "\n".join(stale)


# ---------------------------------------------------------------- the site and its generated numbers

def test_site_builds_strictly(tmp_path):
    """mkdocs build --strict: every page of the nav exists, every link and anchor resolves, the API reference renders.

    mkdocs is in the `docs` extra, which scripts/setup.sh installs: a missing mkdocs is a failure, not a skip."""
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"


def test_every_page_is_in_the_nav():
    """A page under docs/ that the nav of mkdocs.yml does not list would be built but unreachable."""
    nav = set(re.findall(r"^\s*-\s[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages - nav == set(), f"pages missing from the nav of mkdocs.yml: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_generated_numbers_match_the_result_files():
    """Every <!-- numbers:NAME --> block equals what scripts/docs_numbers.py generates from the committed JSON."""
    stale = docs_numbers.stale()
    assert not stale, f"numbers blocks differ from the result files in {stale}: run python scripts/docs_numbers.py"


def test_numbers_blocks_are_checked(tmp_path, monkeypatch):
    """The check sees a changed result file: the Pixtral ratio of a copied bench file moves, the block goes stale."""
    copy = tmp_path / "repo"
    (copy / "docs").mkdir(parents=True)
    (copy / "results" / "scale").mkdir(parents=True)
    (copy / "README.md").write_text("# x\n")
    (copy / "docs" / "scale.md").write_text((ROOT / "docs" / "scale.md").read_text())
    bench = json.loads((ROOT / "results" / "scale" / "bench_scale_cpu.json").read_text())
    for path in (ROOT / "results" / "scale").glob("*.json"):
        (copy / "results" / "scale" / path.name).write_text(path.read_text())
    monkeypatch.setattr(docs_numbers, "ROOT", copy)
    assert docs_numbers.stale() == []
    bench["models"]["pixtral"]["steps"]["attribute"]["cpu_s"] = [99.0]
    (copy / "results" / "scale" / "bench_scale_cpu.json").write_text(json.dumps(bench))
    assert docs_numbers.stale() == ["docs/scale.md"]


def test_method_quotes_the_budget_model():
    """docs/method.md section 10 gives the per-row memory model as execution/budget.py's docstring states it."""
    from modality_circuits.execution import budget

    def formulas(text):
        return re.findall(r"^[ \t]*((?:forward|backward):)[ \t]+(.*?)(?:[ \t]{2,}|$)", text, re.MULTILINE)
    assert len(formulas(budget.__doc__)) == 2
    assert formulas(METHOD.read_text()) == formulas(budget.__doc__)


# ---------------------------------------------------------------- snippets, paths and names

FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
NO_RUN = re.compile(r"<!--\s*no-run:\s*(\S.*?)\s*-->")
#: Paths the docs name that a command creates (not in a clone).
MADE_BY_COMMANDS = {".venv/"}
#: Names the docs use as variables in prose (`model.memory_budget`), not as modules of the package.
VARIABLES = {"model", "p", "pair", "pairs", "circuit", "scores", "curve"}
FILE_SUFFIXES = (".py", ".md", ".json", ".sh", ".yml", ".yaml", ".toml", ".png", ".pdf", ".csv", ".safetensors",
                 ".jinja", ".txt")


def _snippets() -> list:
    """(id, code, no-run reason or None) of every ```python block of README.md and docs/*.md."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(2) != "python":
                continue
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip().rsplit("\n", 1)[-1]
            reason = NO_RUN.search(before)
            code = "\n".join(l[len(m.group(1)):] for l in m.group(3).splitlines())
            out.append((f"{path.relative_to(ROOT)}:{line}", code, reason.group(1) if reason else None))
    return out


SNIPPETS = _snippets()


RUNNABLE = {c: n for n, c, r in reversed(SNIPPETS) if r is None}  # a block repeated on two pages runs once


@pytest.mark.parametrize("name,code", [(n, c) for c, n in RUNNABLE.items()], ids=list(RUNNABLE.values()))
def test_snippet_runs_as_written(name, code, monkeypatch):
    """Every Python block of the README and the docs runs as written, in a fresh namespace, from the repository root
    (the same block on two pages runs once). Tasks a block registers are forgotten afterwards."""
    from modality_circuits.tasks import REGISTRY

    monkeypatch.chdir(ROOT)
    registered = dict(REGISTRY)
    try:
        exec(compile(code, name, "exec"), {"__name__": "__snippet__"})
    finally:
        REGISTRY.clear()
        REGISTRY.update(registered)


def test_snippets_that_do_not_run_are_few_and_compile():
    """A block marked <!-- no-run: REASON --> (hub weights, a GPU, a server) still compiles; there are few of them."""
    marked = [(n, c) for n, c, r in SNIPPETS if r is not None]
    for name, code in marked:
        compile(code, name, "exec")
    assert len(marked) <= 6, f"{len(marked)} snippets do not run: {[n for n, _ in marked]}"
    assert len(SNIPPETS) - len(marked) >= 8


def _inline_code(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every `inline code` span outside fenced blocks."""
    text = FENCE.sub(lambda m: "\n" * m.group().count("\n"), path.read_text())
    return [(n, span) for n, line in enumerate(text.splitlines(), 1) for span in re.findall(r"`([^`\n]+)`", line)]


def _looks_like_path(span: str) -> bool:
    return (re.fullmatch(r"[\w.\-/]+", span) is not None and not span.startswith(("/", "http"))
            and ("/" in span or span.endswith(FILE_SUFFIXES)) and not re.fullmatch(r"[\w.]+\(\)?", span))


def _path_exists(span: str) -> bool:
    if span in MADE_BY_COMMANDS:
        return True
    if (ROOT / span).exists() or (ROOT / "modality_circuits" / span).exists():
        return True
    if "/" not in span.rstrip("/"):  # a bare file name: somewhere in the repository
        return any(p for p in ROOT.rglob(span) if ".git" not in p.parts and ".venv" not in p.parts)
    return False


def _package_index() -> dict:
    """Short name -> objects of the package it may mean: every module and subpackage, every module-level class."""
    import importlib
    import inspect
    import pkgutil

    import modality_circuits

    index = {"modality_circuits": [modality_circuits]}
    for info in pkgutil.walk_packages(modality_circuits.__path__, "modality_circuits."):
        if ".zoo.toy_vlm" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        index.setdefault(info.name.rsplit(".", 1)[-1], []).append(module)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and getattr(obj, "__module__", "").startswith("modality_circuits"):
                index.setdefault(name, []).append(obj)
    return index


_ABSENT = object()


def _has(obj, name: str):
    """obj.name, a dataclass field or an annotated attribute of obj (a class), or a submodule; _ABSENT if none."""
    import importlib

    if hasattr(obj, name):
        return getattr(obj, name)
    if name in getattr(obj, "__dataclass_fields__", {}) or name in getattr(obj, "__annotations__", {}):
        return name
    if hasattr(obj, "__path__"):
        try:
            return importlib.import_module(f"{obj.__name__}.{name}")
        except ImportError:
            return _ABSENT
    return _ABSENT


def _resolves(start, rest: list[str]) -> bool:
    obj = start
    for part in rest:
        obj = _has(obj, part)
        if obj is _ABSENT:
            return False
    return True


def test_backticked_paths_and_names_exist():
    """Every `path` (a/b.py, dir/, name.json) names a file of the repository (or of the package), and every dotted
    `name` of the package (modality_circuits.x.y, VLM.FORWARD, zoo.SHORT_NAMES) resolves: a rename breaks this test."""
    index = _package_index()
    missing = []
    for path in DOCS:
        for line, span in _inline_code(path):
            where = f"{path.relative_to(ROOT)}:{line}: `{span}`"
            if _looks_like_path(span):
                if not _path_exists(span):
                    missing.append(where)
                continue
            name = re.match(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", span)
            if name is None or name.group().split(".")[0] in VARIABLES:
                continue
            first, *rest = name.group().split(".")
            if first in index and not any(_resolves(obj, rest) for obj in index[first]):
                missing.append(where)
    assert not missing, "backticked paths or names that do not exist:\n" + "\n".join(missing)
