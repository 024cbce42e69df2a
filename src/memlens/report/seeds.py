"""Across training seeds: each configuration's mean AUC and TPR@1%FPR over its seeds, and the paper's paired
differences (V-Q, V-K, O-Q, O-K) of those means, each with a two-level bootstrap interval that counts both the seed
and the record variation (:func:`memlens.metrics.seed_record_bootstrap`); and the CSV files of the per-run metrics,
of these means and of these differences.

A configuration enters only with at least two seeds whose runs scored the same records (canaries left out, as in
every AUC); a comparison only between configurations that differ in the adapted matrices alone.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from memlens import metrics as M
from memlens.report import data as D
from memlens.report.timing import run_clock

PAIRS = (("V", "Q"), ("V", "K"), ("O", "Q"), ("O", "K"))
TPR_AT = 0.01


def _scores(conn, runs: list[D.RunView], attack: str) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The member labels and each run's scores on their common records; None when the runs differ in their records
    or in which of them are members (another data seed can draw the same records into other roles)."""
    y, ids, vectors = None, None, []
    for r in runs:
        sc = D.sample_scores(conn, r.run_id, [f"score_{attack}"])
        canaries = D.canary_ids(conn, r.run_id)
        keep = [k for k, i in enumerate(sc["ids"]) if i not in canaries]
        run_ids = [sc["ids"][k] for k in keep]
        if ids is None:
            ids, y = run_ids, sc["member"][keep]
        elif run_ids != ids or not np.array_equal(sc["member"][keep], y):
            return None
        vectors.append(sc[f"score_{attack}"][keep])
    if any(not np.isfinite(v).all() for v in vectors):
        return None
    return y, vectors


def _configurations(runs: list[D.RunView]) -> dict[str, list[D.RunView]]:
    """Runs grouped by configuration (all but the seeds), one run per seed pair (the first stored), with two or
    more seeds."""
    groups: dict[str, dict[tuple, D.RunView]] = defaultdict(dict)
    for r in runs:
        groups[r.key].setdefault(r.seeds, r)
    return {k: [by[s] for s in sorted(by)] for k, by in groups.items() if len(by) >= 2}


def seed_rows(conn, runs: list[D.RunView], attack: str, n_boot: int = 1000) -> list[dict[str, Any]]:
    """One row per configuration with two or more seeds: mean AUC and TPR@1%FPR with seed-and-record intervals."""
    rows = []
    for rs in _configurations(runs).values():
        got = _scores(conn, rs, attack)
        if got is None:
            continue
        y, vectors = got
        a = M.seed_record_bootstrap(y, vectors, metric="auc", n_boot=n_boot)
        t = M.seed_record_bootstrap(y, vectors, metric=f"tpr@{TPR_AT}", n_boot=n_boot)
        rows.append({"targets": rs[0].targets, "rank": rs[0].rank, "seeds": [r.seeds[0] for r in rs],
                     "n_members": a.n_members, "n_nonmembers": a.n_nonmembers, "auc": a.value, "auc_lo": a.lo,
                     "auc_hi": a.hi, "tpr1": t.value, "tpr1_lo": t.lo, "tpr1_hi": t.hi,
                     "tpr1_below_resolution": TPR_AT < 1 / a.n_nonmembers, "trainable": rs[0].trainable})
    return rows


def seed_pairs(conn, runs: list[D.RunView], attack: str, n_boot: int = 1000) -> list[dict[str, Any]]:
    """The differences of the mean over seeds, V or O minus Q or K, at each rank and otherwise equal settings."""
    by: dict[tuple, list[D.RunView]] = {}
    for rs in _configurations(runs).values():
        by[(rs[0].targets, rs[0].settings_key(("lora.targets", "train.seed", "data.seed")))] = rs
    rows = []
    for (a_t, rest), ra in sorted(by.items(), key=lambda kv: (kv[1][0].rank or 0, kv[0][0])):
        for a, b in PAIRS:
            if a_t != a or (b, rest) not in by:
                continue
            rb = by[(b, rest)]
            got = _scores(conn, ra + rb, attack)
            if got is None:
                continue
            y, vectors = got
            va, vb = vectors[: len(ra)], vectors[len(ra):]
            row = {"a": a, "b": b, "rank": ra[0].rank, "seeds_a": len(ra), "seeds_b": len(rb),
                   "n_members": int(y.sum()), "n_nonmembers": int((y == 0).sum())}
            for metric, key in (("auc", "auc"), (f"tpr@{TPR_AT}", "tpr1")):
                d = M.seed_record_bootstrap(y, va, vb, metric=metric, n_boot=n_boot)
                row.update({f"{key}_diff": d.value, f"{key}_lo": d.lo, f"{key}_hi": d.hi,
                            f"{key}_verdict": "higher" if d.lo > 0 else "lower" if d.hi < 0 else "not resolved"})
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as a CSV file (columns from the first row; an empty file with no rows)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    tmp.replace(path)
    return path


def run_rows(runs: list[D.RunView], attack: str) -> list[dict[str, Any]]:
    """The per-run metrics of ``attack``: one row per run (no per-record data)."""
    rows = []
    for r in runs:
        auc, tpr = r.metric("auc", attack) or {}, r.metric(f"tpr@{TPR_AT}", attack) or {}
        rows.append({"run": r.name, "run_id": r.run_id[:12], "targets": r.targets, "rank": r.rank,
                     "train_seed": r.seeds[0], "data_seed": r.seeds[1], "trainable": r.trainable,
                     "n_members": r.summary.get("n_members"), "n_nonmembers": r.summary.get("n_nonmembers"),
                     "auc": auc.get("value"), "auc_lo": auc.get("lo"), "auc_hi": auc.get("hi"),
                     "tpr1": tpr.get("value"), "tpr1_lo": tpr.get("lo"), "tpr1_hi": tpr.get("hi"),
                     "heldout_ppl": r.summary.get("perplexity", {}).get("heldout_ft"),
                     "wall_s": run_clock(r.summary)})
    return rows
