"""The interactive circuit viewer: a self-contained page, its data checked against the circuits, and a real headless
browser (Debian's chromium) whose screenshot must show the clicked position's nodes highlighted."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import modality_circuits as mc
from modality_circuits import plot

MAGENTA = (255, 0, 255)  # the viewer's highlight colour
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from conftest import get_tiny

    model = get_tiny("llava")
    cells = {}
    for m in ("text", "image"):
        pairs = mc.build_pairs("counting", m, model, n=4)
        scores = mc.attribute(model, pairs, steps=1, progress=False)
        cells[m] = (mc.Circuit.from_scores(scores, fraction=0.05), pairs[0], scores)
    path = tmp_path_factory.mktemp("view") / "counting.html"
    html = plot.view(cells["text"], cells["image"], path, model=model)
    return path, html, cells


def test_page_is_self_contained_and_holds_every_node(page):
    path, html, cells = page
    assert path.read_text(encoding="utf-8") == html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|<link|@import|url\(\s*["']?https?:""", html)
    panels = json.loads(re.search(r"const PANELS = (.*);\n", html).group(1))
    for panel, modality in zip(panels, ("text", "image")):
        circuit, pair, scores = cells[modality]
        assert panel["tokens"] == pair.tokens
        assert len(panel["heads"]) == int(circuit.heads.sum())
        assert sum(c[0] for c in panel["neurons"].values()) == int(circuit.neurons.sum())
        layer, pos, unit, score = panel["heads"][0]
        assert circuit.heads[layer, unit, pos] and score == pytest.approx(float(scores.heads[layer, unit, pos]))
    assert panels[1]["image"].startswith("data:image/png;base64,") and len(panels[1]["regions"]) == 16  # 4x4 patches


def _screenshot(html_path, fragment: str, out) -> np.ndarray:
    """A headless chromium screenshot of the page (with a URL fragment) as an (H, W, 3) array."""
    profile = out.parent / f"profile{abs(hash(fragment))}"
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1400,900", f"--screenshot={out}",
           f"file://{html_path}{fragment}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: scripts/test.sh installs Debian's chromium; it could not "
                                             "be installed here (apt-get needs root and a package mirror)")
def test_click_state_highlights_the_position_in_a_real_browser(page, tmp_path):
    path, _, cells = page
    circuit = cells["image"][0]
    pos = circuit.nodes()[0]["position"]
    magenta = [(_screenshot(path, frag, tmp_path / f"{k}.png") == MAGENTA).all(-1).sum()
               for k, frag in enumerate(("", f"#select=image:{pos}"))]
    # nothing selected: only the legend's swatch is magenta; selected: the position's cells, token and patch too
    assert magenta[0] < 300 and magenta[1] > magenta[0] + 100, magenta
