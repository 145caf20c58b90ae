"""The researcher's tools: a light import, plots from objects, metadata that refuses mix-ups, readable CLI output."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "nnsight", "matplotlib")


@pytest.mark.parametrize("code", ["import modality_circuits",
                                  "from modality_circuits.study.cli import build_parser; build_parser()"])
def test_import_and_parser_load_no_heavy_library(code):
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_are_the_modules_own():
    import importlib

    import modality_circuits as mc

    for name, module in mc._LAZY.items():
        assert getattr(mc, name) is getattr(importlib.import_module(module, "modality_circuits"), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mc.nope
