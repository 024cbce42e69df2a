"""The report's privacy-over-training sections: trajectories and their thresholds, DP runs beside the one-run audit,
the privacy-utility frontier and the factor table. Each function reads runs (and the store's checkpoints) and
returns plain rows for the template; the computation lives in :mod:`memlens.trajectory`, :mod:`memlens.frontier`
and :mod:`memlens.one_run`."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from memlens import frontier as FR
from memlens.report import data as D

SEED_KEYS = ("train.seed", "data.seed")


def trajectories(conn: sqlite3.Connection, runs: list[D.RunView]) -> list[dict[str, Any]]:
    """Per run with checkpoints: steps, held-out perplexity, and the signal attack's AUC and TPR at 1% FPR with
    their intervals, plus the threshold from the run's summary."""
    from memlens.store import checkpoint_table

    out = []
    for r in runs:
        traj = r.summary.get("trajectory")
        if not traj:
            continue
        _, rows = checkpoint_table(conn, r.run_id)
        attack = traj["threshold"]["attack"]
        by_step: dict[int, dict[str, Any]] = {}
        for step, epoch, name, subject, value, lo, hi in rows:
            p = by_step.setdefault(step, {"step": step, "epoch": epoch})
            if name in ("heldout_ppl", "heldout_nll", "train_loss", "members_nll"):
                p[name] = value
            elif subject == attack and name in ("auc", "tpr@0.01"):
                p[name] = (value, lo, hi)
        out.append({"run": r.name, "label": _label(r), "attack": attack,
                    "points": [by_step[s] for s in sorted(by_step)], "threshold": traj["threshold"]})
    return out


def dp_rows(runs: list[D.RunView], attack: str) -> list[dict[str, Any]]:
    """Runs with DP or one-run canaries: the accountant's epsilon, the one-run lower bound, leakage and utility."""
    out = []
    for r in runs:
        dp, one = r.summary.get("dp"), r.summary.get("one_run")
        if dp is None and one is None:
            continue
        auc, tpr = r.metric("auc", attack), r.metric("tpr@0.01", attack)
        out.append({"run": r.name, "label": _label(r), "epsilon_target": (dp or {}).get("epsilon_target"),
                    "noise_multiplier": (dp or {}).get("noise_multiplier"),
                    "epsilon_spent": (dp or {}).get("epsilon_spent"), "delta": (dp or {}).get("delta"),
                    "one_run": one, "auc": auc, "tpr": tpr,
                    "heldout_ppl": r.summary.get("perplexity", {}).get("heldout_ft")})
    return out


def run_points(runs: list[D.RunView], attack: str) -> list[dict[str, Any]]:
    """One point per run: held-out perplexity and the attack's AUC and TPR at 1% FPR with intervals."""
    pts = []
    settings = varying(runs)
    for r in runs:
        auc, tpr = r.metric("auc", attack), r.metric("tpr@0.01", attack)
        ppl = r.summary.get("perplexity", {}).get("heldout_ft")
        if auc is None or ppl is None:
            continue
        pts.append({"run": r.name, "run_id": r.run_id, "label": _label(r), "heldout_ppl": ppl, "auc": auc["value"],
                    "auc_lo": auc["lo"], "auc_hi": auc["hi"], "tpr": (tpr or {}).get("value"), "tpr_lo": (tpr or {}).get("lo"),
                    "tpr_hi": (tpr or {}).get("hi"), **settings.get(r.run_id, {})})
    return pts


def frontier(runs: list[D.RunView], attack: str, max_perplexity: float | None) -> dict[str, Any] | None:
    pts = run_points(runs, attack)
    if not pts:
        return None
    mask = FR.pareto_front([p["heldout_ppl"] for p in pts], [p["auc"] for p in pts])  # (one point: its own front)
    for p, on in zip(pts, mask):
        p["on_front"] = bool(on)
    choice = FR.least_leakage(pts, max_perplexity) if max_perplexity is not None else None
    return {"points": pts, "choice": choice}


def factors(runs: list[D.RunView], attack: str) -> list[dict[str, Any]]:
    """Factor tables of the study's axes (the settings that vary across runs, seeds as replicates) on AUC and on
    held-out perplexity."""
    pts = run_points(runs, attack)
    axes = sorted({k for v in varying(runs).values() for k in v})
    if not pts or not axes:
        return []
    return [FR.factor_table(pts, axes, "auc"), FR.factor_table(pts, axes, "heldout_ppl")]


def varying(runs: list[D.RunView]) -> dict[str, dict[str, str]]:
    """Per run, the dotted settings that differ across runs (seeds excepted), as short strings."""
    flat = {r.run_id: _flatten({k: v for k, v in r.identity().items() if k != "resolved"}) for r in runs}
    keys = {k for f in flat.values() for k in f} - set(SEED_KEYS)
    vary = [k for k in sorted(keys) if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
    return {rid: {k: _short(f.get(k)) for k in vary} for rid, f in flat.items()}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("dp",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    if v is None:
        return "off"
    if isinstance(v, list):
        return "+".join(str(x) for x in v)
    if isinstance(v, dict):  # train.dp: its target
        if v.get("epsilon") is not None:
            return f"eps {v['epsilon']:g}"
        if v.get("noise_multiplier") is not None:
            return f"sigma {v['noise_multiplier']:g}"
        return json.dumps(v, sort_keys=True)
    return str(v)


def _label(r: D.RunView) -> str:
    dp = r.config.get("train", {}).get("dp")
    return f"{r.targets} r{r.rank}" + (f" {_short(dp)}" if dp else "")
