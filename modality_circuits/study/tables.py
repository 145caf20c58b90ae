"""Plain-text tables of the study's records for the command line (`--json` prints the records themselves).

Units as everywhere: faithfulness, nIoU and accuracy as fractions, accuracy gains in points, layers 0-based.
"""
from __future__ import annotations

import math

from ..data.pairs import SPANS
from .labels import SPAN_NAMES


def table(headers: list[str], rows: list[list]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    right = [all(isinstance(row[k], (int, float)) for row in rows) for k in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, right)).rstrip()
             for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def ci(c: dict, fmt: str = ".3f") -> str:
    """"0.412 [0.301, 0.522]" of a CI record (null bounds: no interval)."""
    if c is None or not _finite(c.get("value")):
        return "-"
    if not (_finite(c.get("low")) and _finite(c.get("high"))):
        return format(c["value"], fmt)
    return f"{c['value']:{fmt}} [{c['low']:{fmt}}, {c['high']:{fmt}}]"


def curve(record: dict, task: str, modality: str) -> str:
    """The curve at MIB's fractions and at the circuit's (`--json`: every fraction)."""
    from ..methods.ablation import MIB_GRID

    found = f"{record['minimal_fraction']:.1%}" if record["minimal_fraction"] is not None else "not reached"
    rows = [[f"{f:.1%}", ci(c)] for f, c in zip(record["fractions"], record["ci"])
            if f in MIB_GRID or f == record["circuit_fraction"]]
    return (f"{task}/{modality}: faithfulness on {record['n_eval_pairs']} evaluation pairs; smallest fraction with "
            f"F >= {record['threshold']}: {found}; circuit at {record['circuit_fraction']:.1%}; CPR {record['cpr']:.3f}, "
            f"CMD {record['cmd']:.3f}\n" + table(["fraction kept", "F [95% CI]"], rows))


def overlap(record: dict) -> str:
    rows = [[SPAN_NAMES[s], ci(record[s]["niou"]), record[s]["niou_heads"], record[s]["niou_neurons"],
             record[s]["iou_heads"], record[s]["iou_neurons"]] for s in SPANS]
    note = "".join(f"\n{s}: {record[s]['niou_reason']}" for s in SPANS if "niou_reason" in record[s])
    return table(["span", "nIoU [95% CI]", "nIoU heads", "nIoU neurons", "IoU heads", "IoU neurons"], rows) + note


def interchange(record: dict) -> str:
    from ..execution.store import nan_for_null
    from .steps import interchange_margin, interchange_readable

    def score(r: dict) -> str:  # n/a where the denominator is noise, the margin beside it (as the report shows it)
        return ci(r["score"]) if interchange_readable(r) else f"n/a (ΔF {interchange_margin(r):.2f})"

    rows = [[SPAN_NAMES[s], score(nan_for_null(record[s])), record[s]["visual_score"], record[s]["text_score"],
             f"{interchange_margin(nan_for_null(record[s])):.2f}"] for s in SPANS]
    return table(["swapped span", "score [95% CI]", "visual circuit", "textual circuit", "margin ΔF"], rows)


def alignment(record: dict) -> str:
    rows = [[layer, ci(c)] for layer, c in enumerate(record["ci"])]
    return f"{record['n_prompts']} prompts\n" + table(["layer", "max cosine to text data tokens [95% CI]"], rows)


def backpatch(record: dict) -> str:
    if record.get("skipped"):
        return f"back-patching skipped: {record['skipped']}"
    rows = []
    for m in ("image", "text"):
        r, c = record[m], record[m]["config"]
        rows.append([m, f"({c['src']}, {c['dst']}, {c['window']})", ci(r["base"]), ci(r["patched"]),
                     ci(r["gain_points"], "+.1f"), r["n_test"]])
    return table(["prompts", "(src, dst, window)", "accuracy before", "after", "gain (points)", "test prompts"], rows)


def nodes(records: list[dict]) -> str:
    """A circuit's nodes (`Circuit.nodes(pair, scores)`), one row each."""
    if not records:
        return "(no nodes)"
    rows = [[r["kind"], r["layer"], r["unit"], r["position"], r["span"] or "-", r.get("token", "-"),
             "-" if r.get("patch") is None else f"r{r['patch'][0]}c{r['patch'][1]}",
             "-" if r.get("score") is None else f"{r['score']:+.3g}"] for r in records]
    return table(["kind", "layer", "unit", "position", "span", "token", "patch", "score"], rows)


ANALYSES = {"overlap": overlap, "interchange": interchange, "alignment": alignment, "backpatch": backpatch}
