"""The privacy-utility frontier of a study and the effect of each of its axes ("controllable factors").

Pure computation over a table of runs (one dict a run): no store, no files.

* **Frontier.** Every run is a point: utility = held-out perplexity (lower is better), leakage = an attack's AUC or
  TPR at 1% FPR (lower is better). A run is on the Pareto frontier when no other run is at least as good on both
  and better on one (:func:`pareto_front`).
* **Least leakage at a utility** (:func:`least_leakage`): among the runs whose held-out perplexity is at most the
  one the user names, the run with the lowest leakage, and the others whose leakage interval overlaps its own (the
  intervals cannot tell them apart, so the choice among them is not a verdict).
* **Factors** (:func:`factor_table`): an ordinary least-squares fit over runs, ``outcome ~ C(axis1) + C(axis2) +
  ...`` (statsmodels), each axis a categorical variable with its first level as the reference, training seeds as
  replicates. Each row gives a level's effect against the reference level with its 95% interval and p-value. The
  fit is refused (a note says why) when the runs leave fewer than ``min_resid_df`` residual degrees of freedom:
  with every run spent on the coefficients there is no error estimate, and no interval to believe.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def pareto_front(utility: Sequence[float], leakage: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point dominates (both coordinates lower is better)."""
    u, l = np.asarray(utility, dtype=float), np.asarray(leakage, dtype=float)
    n = len(u)
    out = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = (u <= u[i]) & (l <= l[i]) & ((u < u[i]) | (l < l[i]))
        out[i] = not dominated.any()
    return out


def least_leakage(runs: Sequence[dict[str, Any]], max_perplexity: float, leakage: str = "auc") -> dict[str, Any]:
    """The run of least ``leakage`` among those with ``heldout_ppl`` <= ``max_perplexity``.

    Each run needs ``heldout_ppl``, ``leakage`` and ``<leakage>_lo`` / ``<leakage>_hi`` (its interval). Returns
    ``best`` (the run or None), ``eligible`` (how many runs qualify) and ``tied`` (the other eligible runs whose
    interval overlaps the best's).
    """
    eligible = [r for r in runs if r["heldout_ppl"] <= max_perplexity]
    if not eligible:
        return {"best": None, "eligible": 0, "tied": [], "max_perplexity": max_perplexity}
    best = min(eligible, key=lambda r: r[leakage])
    tied = [r for r in eligible if r is not best and r[f"{leakage}_lo"] <= best[f"{leakage}_hi"]]
    return {"best": best, "eligible": len(eligible), "tied": tied, "max_perplexity": max_perplexity}


def factor_table(runs: Sequence[dict[str, Any]], axes: Sequence[str], outcome: str, level: float = 0.95,
                 min_resid_df: int = 3) -> dict[str, Any]:
    """OLS of ``outcome`` on the categorical ``axes`` over ``runs`` (see the module docstring).

    Returns ``rows`` (axis, level, reference level, effect, lo, hi, p, n runs at that level), the fit's ``n``,
    residual degrees of freedom and R^2, and ``note`` when no fit was made.
    """
    import pandas as pd
    import statsmodels.formula.api as smf

    data = pd.DataFrame([{**{a: str(r[a]) for a in axes}, "y": float(r[outcome])} for r in runs])
    used = [a for a in axes if data[a].nunique() > 1]  # an axis with one level has no effect to estimate
    out: dict[str, Any] = {"outcome": outcome, "n": len(data), "axes": used, "rows": []}
    if not used:
        out["note"] = "no axis varies across these runs"
        return out
    n_coef = 1 + sum(data[a].nunique() - 1 for a in used)
    resid_df = len(data) - n_coef
    if resid_df < min_resid_df:
        out["note"] = (f"{len(data)} runs for {n_coef} coefficients leave {resid_df} residual degrees of freedom "
                       f"(at least {min_resid_df} needed): no fit; add seeds")
        return out
    names = {a: f"x{i}" for i, a in enumerate(used)}  # safe column names for the formula
    frame = data.rename(columns=names)
    refs = {a: sorted(data[a].unique(), key=_level_key)[0] for a in used}
    terms = " + ".join(f"C({names[a]}, Treatment(reference={refs[a]!r}))" for a in used)
    fit = smf.ols(f"y ~ {terms}", data=frame).fit()
    ci = fit.conf_int(alpha=1 - level)
    for a in used:
        prefix = f"C({names[a]}, Treatment(reference={refs[a]!r}))[T."
        for lvl in sorted(data[a].unique(), key=_level_key):
            if lvl == refs[a]:
                continue
            key = f"{prefix}{lvl}]"
            out["rows"].append({"axis": a, "level": lvl, "reference": refs[a], "effect": float(fit.params[key]),
                                "lo": float(ci.loc[key, 0]), "hi": float(ci.loc[key, 1]),
                                "p": float(fit.pvalues[key]), "n": int((data[a] == lvl).sum())})
    out.update(resid_df=int(fit.df_resid), r2=float(fit.rsquared))
    return out


def _level_key(v: str) -> tuple:
    """Numbers in numeric order before words ("off" sorts first, as the reference, among words)."""
    try:
        return (1, float(v), v)
    except ValueError:
        return (0 if v in ("off", "none", "None") else 2, 0.0, v)
