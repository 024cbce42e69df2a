"""The membership probe: metrics of every attack's scores on the audited records, as rows of the results store.

For each attack: ROC AUC with its Hanley-McNeil and bootstrap 95% intervals, and TPR at each target FPR with a
bootstrap interval, flagged when the target is below the FPR resolution 1/N (N non-members). For attacks compared
with a baseline attack (the new reference attacks against ``ref_ratio``): the paired bootstrap difference of AUC
and of TPR at 1% FPR on the same records. Pure computation: arrays in, rows out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memlens import metrics as M


def attack_rows(y: np.ndarray, scores: dict[str, np.ndarray], fprs: list[float], n_boot: int
                ) -> tuple[list[tuple], dict[str, dict[str, Any]]]:
    """Metric rows ``(metric, attack, value, lo, hi, details)`` and a per-attack headline for the summary."""
    rows, headline = [], {}
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    for a, s in scores.items():
        value = M.auc(y, s)
        lo, hi = M.hanley_mcneil_ci(value, n_pos, n_neg)
        boot = M.bootstrap_auc_ci(y, s, n_boot=n_boot) if n_boot else (None, None)
        rows.append(("auc", a, value, lo, hi, {"interval": "hanley-mcneil 95%", "bootstrap_95": boot,
                                               "n_members": n_pos, "n_nonmembers": n_neg}))
        row = {"auc": value, "auc_lo": lo, "auc_hi": hi, "bootstrap": boot}
        for x in fprs:
            tp = M.tpr_at_fpr(y, s, x)
            tlo, thi = M.bootstrap_tpr_ci(y, s, x, n_boot=n_boot) if n_boot else (None, None)
            rows.append((f"tpr@{x:g}", a, tp.tpr, tlo, thi, {**tp.as_dict(), "interval": "bootstrap 95%"}))
            row[f"tpr@{x:g}"] = tp.tpr
            row[f"tpr@{x:g}_ci"] = (tlo, thi)
            row[f"tpr@{x:g}_below_resolution"] = tp.below_resolution
        headline[a] = row
    return rows, headline


def paired_rows(y: np.ndarray, scores: dict[str, np.ndarray], baseline: str, attacks: list[str], n_boot: int,
                fpr: float = 0.01) -> tuple[list[tuple], dict[str, dict[str, Any]]]:
    """Paired bootstrap differences ``attack - baseline`` of AUC and of TPR at ``fpr``, on the same records."""
    rows, out = [], {}
    if baseline not in scores:
        return rows, out
    for a in attacks:
        if a == baseline or a not in scores:
            continue
        entry = {}
        for metric in ("auc", f"tpr@{fpr:g}"):
            d = M.paired_difference(y, scores[a], scores[baseline], metric, n_boot=max(n_boot, 200))
            rows.append((f"paired:{metric}", f"{a}-{baseline}", d.diff, d.lo, d.hi, d.as_dict()))
            entry[metric] = {"diff": d.diff, "lo": d.lo, "hi": d.hi, "a": d.a, "b": d.b}
        tb = M.tpr_at_fpr(y, scores[baseline], fpr).tpr
        ta = M.tpr_at_fpr(y, scores[a], fpr).tpr
        entry["tpr_ratio"] = ta / tb if tb > 0 else (float("inf") if ta > 0 else float("nan"))
        out[a] = entry
    return rows, out
