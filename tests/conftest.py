import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*skipped.*candidate pairs.*")

from modality_circuits.testing import FAMILIES, tiny_model  # noqa: E402

_CACHE = {}


def get_tiny(family):
    if family not in _CACHE:
        _CACHE[family] = tiny_model(family)
    return _CACHE[family]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids oversubscribing a busy 2-core machine (ops 100x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def tiny(request):
    return get_tiny(request.param)


@pytest.fixture
def llava():
    return get_tiny("llava")
