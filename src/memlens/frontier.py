"""The privacy-utility frontier of a study and the effect of each of its axes ("controllable factors").

Pure computation over a table of runs (one dict a run): no store, no files.

* **Frontier.** Every run is a point: utility = held-out perplexity (lower is better), leakage = an attack's AUC or
  TPR at 1% FPR (lower is better). A run is on the Pareto frontier when no other run is at least as good on both
  and better on one (:func:`pareto_front`).
* **Least leakage at a utility** (:func:`least_leakage`): among the runs whose held-out perplexity is at most the
  one the user names, the run with the lowest leakage, and the others whose leakage interval overlaps its own (the
  intervals cannot tell them apart, so the choice among them is not a verdict).
* **Factors** (:func:`factor_table`): an ordinary least-squares fit over runs (statsmodels), each axis a
  categorical variable in treatment coding (an indicator per level but the first, the reference), training seeds
  as replicates. Each row gives a level's effect against the reference level with its 95% interval and p-value. The
  fit is refused (a note says why) when the runs leave fewer than ``min_resid_df`` residual degrees of freedom:
  with every run spent on the coefficients there is no error estimate, and no interval to believe.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def pareto_front(utility: Sequence[float], leakage: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point dominates (both coordinates lower is better)."""
    u, l = np.asarray(utility, dtype=float), np.asarray(leakage, dtype=float)
    ok = np.isfinite(u) & np.isfinite(l)  # a point without a number is on no frontier
    out = np.zeros(len(u), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (u <= u[i]) & (l <= l[i]) & ((u < u[i]) | (l < l[i]))
        out[i] = not dominated.any()
    return out


def least_leakage(runs: Sequence[dict[str, Any]], max_perplexity: float, leakage: str = "auc") -> dict[str, Any]:
    """The run of least ``leakage`` among those with ``heldout_ppl`` <= ``max_perplexity``.

    Each run needs ``heldout_ppl``, ``leakage`` and ``<leakage>_lo`` / ``<leakage>_hi`` (its interval). Returns
    ``best`` (the run or None), ``eligible`` (how many runs qualify) and ``tied`` (the other eligible runs whose
    interval overlaps the best's).
    """
    eligible = [r for r in runs if r["heldout_ppl"] <= max_perplexity and r[leakage] is not None
                and np.isfinite(r[leakage])]
    if not eligible:
        return {"best": None, "eligible": 0, "tied": [], "max_perplexity": max_perplexity}
    best = min(eligible, key=lambda r: r[leakage])
    tied = [r for r in eligible if r is not best and r[f"{leakage}_lo"] <= best[f"{leakage}_hi"]]
    return {"best": best, "eligible": len(eligible), "tied": tied, "max_perplexity": max_perplexity}


def factor_table(runs: Sequence[dict[str, Any]], axes: Sequence[str], outcome: str, level: float = 0.95,
                 min_resid_df: int = 3) -> dict[str, Any]:
    """OLS of ``outcome`` on the categorical ``axes`` over ``runs`` (see the module docstring).

    Returns ``rows`` (axis, level, reference level, effect, lo, hi, p, n runs at that level), the fit's ``n``,
    residual degrees of freedom and R^2, and ``note`` when no fit was made: too few residual degrees of freedom, or
    axes that vary together (a design of deficient rank, whose effects cannot be told apart). Runs whose outcome is
    missing are left out before anything is counted.
    """
    import statsmodels.api as sm

    runs = [r for r in runs if r.get(outcome) is not None and np.isfinite(float(r[outcome]))]
    levels = {a: sorted({str(r[a]) for r in runs}, key=_level_key) for a in axes}
    used = [a for a in axes if len(levels[a]) > 1]  # an axis with one level has no effect to estimate
    out: dict[str, Any] = {"outcome": outcome, "n": len(runs), "axes": used, "rows": []}
    if not used:
        out["note"] = "no axis varies across these runs"
        return out
    columns = [(a, lvl) for a in used for lvl in levels[a][1:]]  # treatment coding: the first level is the reference
    x = np.array([[1.0] + [float(str(r[a]) == lvl) for a, lvl in columns] for r in runs])
    y = np.array([float(r[outcome]) for r in runs])
    resid_df = len(runs) - x.shape[1]
    if resid_df < min_resid_df:
        out["note"] = (f"{len(runs)} runs for {x.shape[1]} coefficients leave {resid_df} residual degrees of freedom "
                       f"(at least {min_resid_df} needed): no fit; add seeds")
        return out
    if np.linalg.matrix_rank(x) < x.shape[1]:
        out["note"] = "some settings vary together across these runs (the design is not of full rank): their " \
                      "effects cannot be told apart; no fit"
        return out
    fit = sm.OLS(y, x).fit()
    ci = fit.conf_int(alpha=1 - level)
    for j, (a, lvl) in enumerate(columns, start=1):
        out["rows"].append({"axis": a, "level": lvl, "reference": levels[a][0], "effect": float(fit.params[j]),
                            "lo": float(ci[j, 0]), "hi": float(ci[j, 1]), "p": float(fit.pvalues[j]),
                            "n": int(sum(str(r[a]) == lvl for r in runs))})
    out.update(resid_df=int(round(fit.df_resid)), r2=float(fit.rsquared))
    return out


def _level_key(v: str) -> tuple:
    """Numbers in numeric order before words ("off" sorts first, as the reference, among words)."""
    try:
        return (1, float(v), v)
    except ValueError:
        return (0 if v in ("off", "none", "None") else 2, 0.0, v)
