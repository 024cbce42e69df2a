"""One-run privacy audit (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run").

m canaries (``data.canary.one_run``: new formatted texts, see :mod:`memlens.exposure`) are each put into the
training set once with probability 1/2, independently. After training, each canary's score is its mean NLL under
the base model minus under the fine-tuned one (the loss calibrated by the base model). The auditor guesses "in" for the
``guesses`` highest scores and "out" for the ``guesses`` lowest, abstaining on the rest: r = 2 x guesses guesses, v
of them correct.

For an (epsilon, delta)-DP training run, the paper's Theorem 5.2 bounds the chance of v or more correct guesses:

    P[V >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,   f(u) = P[Binomial(r, p) >= u],

with p = e^eps / (1 + e^eps), the accuracy of eps-DP randomized response (with delta = 0 the bound is f(v): each
guess is right with probability at most p). The audit's lower bound at confidence 1 - beta is the largest eps that
the observed v rejects at level beta, found by bisection (:func:`epsilon_lower_bound`); 0 where no eps is rejected.
For a run without DP the bound is still a valid statement about the training run (a lower bound on any eps it
could be claimed to satisfy at that delta).

With every guess right (v = r) and delta = 0 the bound has a closed form: p^r = beta, eps = log(p / (1 - p)) with
p = beta^(1/r).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The chance of ``v`` or more correct guesses out of ``r`` under (``eps``, ``delta``)-DP, with ``m`` canaries
    each included with probability 1/2 (the paper's Theorem 5.2); capped at 1."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got eps={eps}, delta={delta}")
    p = 1.0 / (1.0 + math.exp(-eps))

    def f(u: int) -> float:  # P[Binomial(r, p) >= u]
        return 1.0 if u <= 0 else float(stats.binom.sf(u - 1, r, p))

    fv = f(v)
    extra = 0.0
    if delta > 0:
        extra = 2 * m * delta * max((f(v - i) - fv) / i for i in range(1, v + 1)) if v > 0 else 0.0
    return min(1.0, fv + extra)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95,
                        tol: float = 1e-6) -> float:
    """The largest eps rejected at level ``1 - confidence`` by ``v`` correct guesses of ``r`` (0 if none is)."""
    beta = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:  # p-value rises with eps: widen until eps is no longer rejected
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return math.inf
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses(scores: Sequence[float], included: Sequence[bool], k: int) -> tuple[int, int]:
    """Guess "in" for the ``k`` highest scores and "out" for the ``k`` lowest; returns (r, v): guesses made and
    correct. Ties are broken by canary order (fixed before training, so no information)."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape:
        raise ValueError("one score and one inclusion flag per canary")
    k = min(k, len(s) // 2)
    order = np.argsort(-s, kind="stable")
    top, bottom = order[:k], order[len(s) - k:]
    v = int(inc[top].sum() + (~inc[bottom]).sum())
    return 2 * k, v


def audit(base_nll: Sequence[float], ft_nll: Sequence[float], included: Sequence[bool], k: int, delta: float,
          confidence: float = 0.95) -> dict[str, Any]:
    """The one-run audit of canaries scored by their mean NLL under the base and the fine-tuned model."""
    score = np.asarray(base_nll, dtype=float) - np.asarray(ft_nll, dtype=float)
    m = len(score)
    r, v = guesses(score, included, k)
    return {"m": m, "included": int(np.sum(included)), "guesses": r, "correct": v,
            "accuracy": v / r if r else float("nan"), "delta": delta, "confidence": confidence,
            "epsilon_lb": epsilon_lower_bound(m, r, v, delta, confidence)}
