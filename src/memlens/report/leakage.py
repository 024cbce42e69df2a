"""The report's field-leakage and adapter-anatomy sections: per run, the field table (completion and the candidate
game by field type) and the heatmap of the adapter's update sizes; across a study's runs, the field rates by
configuration and how the update's size relates to leakage. Reads runs; the computation lives in
:mod:`memlens.fields` and :mod:`memlens.anatomy`."""

from __future__ import annotations

from typing import Any

import numpy as np

from memlens import metrics as M
from memlens.report import data as D

MIN_RUNS_FOR_CORRELATION = 10  # no correlation, and no interval, on fewer runs


def field_tables(runs: list[D.RunView]) -> list[dict[str, Any]]:
    """Per run with field games: its rows by field type, completion and the candidate game side by side."""
    out = []
    for r in runs:
        f = r.summary.get("fields")
        if not f:
            continue
        top1 = {row["field"]: row for row in f["tables"]["top1"]}
        rows = [{"field": row["field"], "recovered": row, "top1": top1.get(row["field"])}
                for row in f["tables"]["recovered"]]
        sampled = next((row for row in f["tables"].get("sampled", []) if row["field"] == "all"), None)
        out.append({"run": r.name, "label": f"{r.targets} r{r.rank}" + (f" x{r.repeats}" if r.repeats > 1 else ""),
                    "rows": rows, "items": f["items"], "records": f["records"], "repeats": f["repeats"],
                    "candidates": f["candidates"], "sampling": f.get("sampling"), "sampled": sampled})
    return out


def field_series(runs: list[D.RunView], measure: str = "recovered") -> dict[str, dict[str, tuple]]:
    """{configuration label: {field type: (members, non-members, base members, n members)}} for the study figure
    (``measure``: ``recovered`` or ``top1``)."""
    out: dict[str, dict[str, tuple]] = {}
    for t in field_tables(runs):
        key = "recovered" if measure == "recovered" else "top1"
        out[t["label"]] = {row["field"]: (row[key]["members"], row[key]["nonmembers"], row[key]["members_base"],
                                          row[key]["n_members"])
                           for row in t["rows"] if row[key] is not None}
    return out


def anatomy_grid(run: D.RunView, stat: str = "fro") -> tuple[list[int], list[str], np.ndarray] | None:
    """(layers, matrices, values) of one run's anatomy rows (nan where a layer's matrix is not adapted)."""
    rows = [m for m in run.metrics if m["name"] == f"anatomy:{stat}"]
    if not rows:
        return None
    layers = sorted({m["details"]["layer"] for m in rows if m["details"].get("layer") is not None})
    matrices = list(dict.fromkeys(m["details"]["matrix"] for m in rows))
    grid = np.full((len(layers), len(matrices)), np.nan)
    for m in rows:
        if m["details"].get("layer") is not None:
            grid[layers.index(m["details"]["layer"]), matrices.index(m["details"]["matrix"])] = m["value"]
    return layers, matrices, grid


MAX_ANATOMY_COLUMNS = 16


def anatomy_columns(runs: list[D.RunView], stat: str = "relative") -> tuple[list[int], list[str], np.ndarray] | None:
    """One layers x columns grid across runs: a column per run and adapted matrix (the run's label, and the matrix
    where the run adapts several), for the runs whose layers are the first such run's (one model), at most
    :data:`MAX_ANATOMY_COLUMNS` columns."""
    layers, labels, cols = None, [], []
    for r in runs:
        g = anatomy_grid(r, stat)
        if g is None or (layers is not None and g[0] != layers):
            continue
        layers = g[0]
        label = f"{r.targets} r{r.rank}" + (f" x{r.repeats}" if r.repeats > 1 else "")
        for j, m in enumerate(g[1]):
            labels.append(label if len(g[1]) == 1 else f"{label}: {m.upper()}")
            cols.append(g[2][:, j])
    if not cols:
        return None
    return layers, labels[:MAX_ANATOMY_COLUMNS], np.column_stack(cols[:MAX_ANATOMY_COLUMNS])


def size_vs_leakage(runs: list[D.RunView], attack: str) -> dict[str, Any]:
    """Across runs: the adapter's total update size (Frobenius norm over every adapted module) against the
    attack's AUC, the members' field recovery and their candidate-game gain over the base model (top-1, fine-tuned
    - base); Spearman correlations with Fisher-z 95% intervals only from
    :data:`MIN_RUNS_FOR_CORRELATION` runs on (else the points alone)."""
    pts = []
    for r in runs:
        an = r.summary.get("anatomy")
        if not an:
            continue
        size = float(np.sqrt(sum(v["fro"] ** 2 for v in an.values())))
        f = r.summary.get("fields")
        rec = gain = None
        if f:
            rec = next((row["members"] for row in f["tables"]["recovered"] if row["field"] == "all"), None)
            gain = next((row["ft_minus_base"] for row in f["tables"]["top1"] if row["field"] == "all"), None)
        pts.append({"run": r.name, "label": f"{r.targets} r{r.rank}", "size": size, "auc": r.auc(attack),
                    "recovery": rec, "top1_gain": gain})
    out: dict[str, Any] = {"points": pts, "correlations": [], "min_runs": MIN_RUNS_FOR_CORRELATION}
    for what in ("auc", "recovery", "top1_gain"):
        xy = [(p["size"], p[what]) for p in pts if p[what] is not None and p[what] == p[what]]
        if len(xy) >= MIN_RUNS_FOR_CORRELATION:
            c = M.correlation([x for x, _ in xy], [y for _, y in xy], "spearman")
            out["correlations"].append({"against": what, "r": c.r, "lo": c.lo, "hi": c.hi, "n": c.n})
    return out
