"""The report's per-run audit: every attack with its intervals, the reference attacks against ``ref_ratio``, the
blind baseline, and the exposure of formatted canaries. Read from each run's stored summary and metrics."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from memlens.report import data as D

FPRS = (0.001, 0.01, 0.1)


def attack_table(run: D.RunView) -> dict[str, Any]:
    """One run's attacks: AUC (Hanley-McNeil 95%), TPR at 0.1/1/10% FPR (bootstrap 95%, flagged below the FPR
    resolution), and for the reference attacks the paired difference to ``ref_ratio``."""
    s = run.summary
    ref = s.get("references") or {}
    paired = ref.get("paired", {})
    rows = []
    for a, h in s.get("attacks", {}).items():
        row = {"attack": a, "auc": h.get("auc"), "lo": h.get("auc_lo"), "hi": h.get("auc_hi"), "tpr": []}
        for x in FPRS:
            ci = h.get(f"tpr@{x:g}_ci") or (None, None)
            row["tpr"].append({"value": h.get(f"tpr@{x:g}"), "lo": ci[0], "hi": ci[1],
                               "flag": bool(h.get(f"tpr@{x:g}_below_resolution"))})
        p = paired.get(a)
        row["paired"] = p and {"auc": p["auc"], "tpr": p["tpr@0.01"], "ratio": p["tpr_ratio"]}
        rows.append(row)
    return {"run": run.name, "run_id": run.run_id[:12], "rows": rows, "n_members": s.get("n_members"),
            "n_nonmembers": s.get("n_nonmembers"), "blind": s.get("blind"),
            "below_blind": below_blind(s.get("attacks", {}), s.get("blind")),
            "references": {k: ref[k] for k in ("mode", "count", "train_s", "score_s", "rmia_a", "rmia_gamma",
                                               "notes") if k in ref} or None,
            "any_flag": any(t["flag"] for r in rows for t in r["tpr"])}


def below_blind(attacks: dict[str, dict[str, Any]], blind: dict[str, Any] | None) -> str | None:
    """A plain sentence where the blind baseline found members and non-members apart (``memlens.blind``'s
    ``shifted``) and every attack's AUC (a run summary's ``attacks``) is below its interval (no attack separates them
    better than the texts alone); else None."""
    aucs = {a: h["auc"] for a, h in attacks.items() if h.get("auc") is not None}
    if not blind or not blind.get("shifted") or not aucs:
        return None
    best = max(aucs, key=aucs.get)
    if aucs[best] >= blind["lo"]:
        return None
    return (f"No attack separates members from non-members better than the texts alone: the best, {best} "
            f"at AUC {aucs[best]:.3f}, is below the blind baseline's interval ({blind['lo']:.3f} to "
            f"{blind['hi']:.3f}); read these AUCs with that shift in mind, and compare configurations on the same "
            f"records rather than reading an AUC as the leakage itself.")


def exposure_points(runs: list[D.RunView]) -> dict[str, list[tuple[int, float, bool]]]:
    """Exposure of every formatted canary of every run: {estimator: [(repeats, bits, capped)]}."""
    out: dict[str, list] = defaultdict(list)
    for r in runs:
        for c in (r.summary.get("exposure") or {}).get("canaries", []):
            out["rank (interpolation)"].append((c["repeats"], c["rank_exposure"], c["capped"]))
            out["skew-normal (extrapolation)"].append((c["repeats"], c["skewnorm_exposure"], False))
            if c.get("base_rank_exposure") is not None:
                out["base model, rank"].append((c["repeats"], c["base_rank_exposure"], c.get("base_capped", False)))
    return dict(out)
