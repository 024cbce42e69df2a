"""Metrics of a membership attack: ROC, AUC with intervals, TPR at low FPR, correlations, paired differences.

Conventions
-----------
* ``y_true`` is 1 for members and 0 for non-members; a higher score means "more likely a member".
* ROC points come from :func:`sklearn.metrics.roc_curve` with ``drop_intermediate=False``, so no operating point is
  thinned away. Ties in the score share one threshold.
* **TPR at FPR x** (one rule, everywhere): the highest TPR among the ROC operating points whose FPR is <= x, i.e.
  the best member rate an attacker gets with a threshold that flags at most a fraction x of the non-members. With
  N non-members the FPR moves in steps of 1/N; when x < 1/N the only admissible point is FPR = 0 and the value is
  flagged ``below_resolution``.
* Intervals are two-sided 95% by default: Hanley and McNeil (1982) for the AUC, as in the paper, and a stratified
  percentile bootstrap (members and non-members resampled separately).

All functions are pure: arrays in, numbers out.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as _sk_roc_curve


class MemlensUndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given input (for example only one class) and is returned as nan."""


def _check(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values and scores {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 (non-member) and 1 (member)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def _two_classes(y: np.ndarray) -> bool:
    if y.min(initial=1) == y.max(initial=0):
        warnings.warn("only one class present: the metric is undefined", MemlensUndefinedMetricWarning, stacklevel=3)
        return False
    return True


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), every operating point kept; ``thresholds[0] = inf`` (nothing flagged)."""
    y, s = _check(y_true, scores)
    return _sk_roc_curve(y, s, drop_intermediate=False)


def auc(y_true, scores) -> float:
    """ROC AUC = P(score of a random member > score of a random non-member) + 0.5 P(tie)."""
    y, s = _check(y_true, scores)
    if not _two_classes(y):
        return float("nan")
    return float(roc_auc_score(y, s))


def hanley_mcneil_ci(auc_value: float, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float]:
    """Hanley and McNeil (1982) interval: AUC +- z * SE, with SE from Q1 = A/(2-A) and Q2 = 2A^2/(1+A).

    References: J. A. Hanley, B. J. McNeil, "The meaning and use of the area under a ROC curve", Radiology 1982.
    """
    a = auc_value
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    z = stats.norm.ppf(0.5 + level / 2)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, a - half), min(1.0, a + half)


def _average_ranks(block: np.ndarray) -> np.ndarray:
    """1-based ranks within each row of ``block`` (a vector is one row), ties sharing their mean rank: scipy's
    ``rankdata(row)`` in plain numpy, many rows at once (scipy's wrapper costs about 15 times the sort itself at the
    sizes of the bootstrap)."""
    rows = np.atleast_2d(block)
    pos = np.arange(rows.shape[1])
    order = np.argsort(rows, axis=1, kind="stable")
    ordered = np.take_along_axis(rows, order, 1)
    first = np.ones(rows.shape, dtype=bool)  # first of its run of ties
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    last = np.ones(rows.shape, dtype=bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, pos[-1])[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(rows.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2 + 1, 1)
    return ranks.reshape(np.shape(block))


def _auc_from_ranks(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC (ties counted half); a fast twin of sklearn's for the bootstrap."""
    r = _average_ranks(s)
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _bootstrap_aucs(y: np.ndarray, s: np.ndarray, idx: np.ndarray, rows: int = 256) -> np.ndarray:
    """``_auc_from_ranks(y[i], s[i])`` for every row ``i`` of ``idx`` (from :func:`_bootstrap_indices`: every row
    holds the members first), ranked a block of rows at a time instead of one replicate at a time. The ranks are
    half-integers, so their sums, and the AUCs, are exactly those of the one-row function."""
    n1 = int(y.sum())
    n0 = idx.shape[1] - n1
    out = np.empty(idx.shape[0], dtype=np.float64)
    for b in range(0, idx.shape[0], rows):
        ranks = _average_ranks(s[idx[b : b + rows]])
        out[b : b + rows] = (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def _bootstrap_indices(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) indices; members and non-members resampled separately so both counts stay fixed."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.concatenate([rng.choice(pos, (n_boot, pos.size)), rng.choice(neg, (n_boot, neg.size))], axis=1)


def bootstrap_auc_ci(y_true, scores, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Stratified percentile bootstrap interval of the AUC."""
    y, s = _check(y_true, scores)
    if not _two_classes(y):
        return float("nan"), float("nan")
    vals = _bootstrap_aucs(y, s, _bootstrap_indices(y, n_boot, seed))
    return tuple(float(v) for v in np.quantile(vals, [(1 - level) / 2, (1 + level) / 2]))


@dataclass(frozen=True)
class TprAtFpr:
    target_fpr: float
    tpr: float
    fpr: float  # the FPR of the operating point used (<= target_fpr)
    threshold: float
    resolution: float  # 1 / number of non-members: the smallest non-zero FPR
    below_resolution: bool

    def as_dict(self) -> dict:
        return asdict(self)


def tpr_at_fpr(y_true, scores, target_fpr: float) -> TprAtFpr:
    """TPR at a target FPR by the rule in the module docstring (highest TPR with FPR <= target)."""
    y, s = _check(y_true, scores)
    n_neg = int((y == 0).sum())
    if not _two_classes(y):
        return TprAtFpr(target_fpr, float("nan"), float("nan"), float("nan"), float("nan"), True)
    fpr, tpr, thr = _sk_roc_curve(y, s, drop_intermediate=False)
    ok = np.flatnonzero(fpr <= target_fpr + 1e-12)
    best = ok[np.argmax(tpr[ok])]
    res = 1.0 / n_neg
    return TprAtFpr(target_fpr, float(tpr[best]), float(fpr[best]), float(thr[best]), res, target_fpr < res)


def _tpr_by_count(y: np.ndarray, s: np.ndarray, target_fpr: float) -> float:
    """The same TPR as :func:`tpr_at_fpr`, by counting: with m = the most false positives the target allows, the
    best ROC point with at most m negatives flagged flags every positive scored above the (m+1)-th highest negative."""
    neg, pos = s[y == 0], s[y == 1]
    m = int(np.floor(target_fpr * len(neg) + 1e-12 * max(len(neg), 1)))
    if m >= len(neg):
        return 1.0
    v = -np.partition(-neg, m)[m]  # the (m+1)-th highest negative score
    return float((pos > v).sum() / len(pos))


def bootstrap_tpr_ci(y_true, scores, target_fpr: float, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Stratified bootstrap interval of TPR at ``target_fpr`` (the threshold is chosen again in every resample)."""
    y, s = _check(y_true, scores)
    if not _two_classes(y):
        return float("nan"), float("nan")
    idx = _bootstrap_indices(y, n_boot, seed)
    vals = np.array([_tpr_by_count(y[i], s[i], target_fpr) for i in idx])
    return tuple(float(v) for v in np.quantile(vals, [(1 - level) / 2, (1 + level) / 2]))


@dataclass(frozen=True)
class Correlation:
    method: str
    r: float
    lo: float
    hi: float
    p_value: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def correlation(x, y, method: str = "pearson", level: float = 0.95) -> Correlation:
    """Pearson or Spearman correlation with a Fisher-z interval (Spearman: Bonett-Wright variance 1.06/(n-3))."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.size
    if n < 4 or np.std(x) == 0 or np.std(y) == 0:
        warnings.warn("correlation undefined (fewer than 4 points or a constant variable)",
                      MemlensUndefinedMetricWarning, stacklevel=2)
        return Correlation(method, float("nan"), float("nan"), float("nan"), float("nan"), n)
    if method == "pearson":
        res = stats.pearsonr(x, y)
        r, p, var = float(res.statistic), float(res.pvalue), 1.0 / (n - 3)
    elif method == "spearman":
        res = stats.spearmanr(x, y)
        r, p, var = float(res.statistic), float(res.pvalue), 1.06 / (n - 3)
    else:
        raise ValueError(f"unknown correlation method {method!r}")
    z = math.atanh(max(min(r, 1 - 1e-15), -1 + 1e-15))
    half = stats.norm.ppf(0.5 + level / 2) * math.sqrt(var)
    return Correlation(method, r, math.tanh(z - half), math.tanh(z + half), p, n)


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    a: float
    b: float
    diff: float  # a - b
    lo: float
    hi: float
    n_boot: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_difference(y_true, scores_a, scores_b, metric: str = "auc", n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """metric(a) - metric(b) for two attacks or runs scored on the same records, with a paired bootstrap interval.

    Both score vectors are resampled with the same indices, so the shared record-level noise cancels: the interval
    is far narrower than two independent single-run intervals. ``metric`` is ``auc`` or ``tpr@X`` (X a fraction).
    """
    y, a = _check(y_true, scores_a)
    _, b = _check(y_true, scores_b)
    if metric == "auc":
        f = _auc_from_ranks
    elif metric.startswith("tpr@"):
        x = float(metric[4:])

        def f(yy, ss):
            return tpr_at_fpr(yy, ss, x).tpr
    else:
        raise ValueError(f"unknown metric {metric!r}: expected 'auc' or 'tpr@X'")
    if not _two_classes(y):
        return PairedDifference(metric, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), n_boot)
    idx = _bootstrap_indices(y, n_boot, seed)
    if metric == "auc":
        diffs = _bootstrap_aucs(y, a, idx) - _bootstrap_aucs(y, b, idx)
    else:
        diffs = np.array([f(y[i], a[i]) - f(y[i], b[i]) for i in idx])
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    fa, fb = f(y, a), f(y, b)
    return PairedDifference(metric, fa, fb, fa - fb, float(lo), float(hi), n_boot)


@dataclass(frozen=True)
class SeedRecordInterval:
    """The mean of a metric over training seeds (or the difference of two such means), with a two-level bootstrap
    interval that counts both the seed and the record variation."""

    metric: str
    value: float
    lo: float
    hi: float
    n_seeds: tuple[int, ...]  # seeds of each configuration
    n_members: int
    n_nonmembers: int
    n_boot: int

    def as_dict(self) -> dict:
        return asdict(self)


def _metric_fn(metric: str):
    if metric == "auc":
        return _auc_from_ranks
    if metric.startswith("tpr@"):
        x = float(metric[4:])
        return lambda yy, ss: _tpr_by_count(yy, ss, x)
    raise ValueError(f"unknown metric {metric!r}: expected 'auc' or 'tpr@X'")


def seed_record_bootstrap(y_true, runs, others=None, metric: str = "auc", n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> SeedRecordInterval:
    """Mean of ``metric`` over ``runs`` (score vectors of one configuration's training seeds, all on the same
    records ``y_true``); with ``others``, the mean over ``runs`` minus the mean over ``others`` (another
    configuration on the same records).

    Two-level percentile bootstrap: each replicate draws the records with replacement (members and non-members
    apart; one draw shared by every run, so that record-level noise common to the configurations cancels in a
    difference), then each configuration's seeds with replacement (apart: seed i of one configuration has nothing to
    do with seed i of another), and takes the mean(s) of the metric over the drawn seeds. The drawn seeds' deviation
    from the mean of all seeds is scaled by sqrt(S / (S - 1)), so that the seed variance is not underestimated by
    the factor (S - 1) / S. With few seeds the interval is still approximate: a mean of 3 seeds has a t-like
    spread that a resampling of 3 values cannot show, so read it as a lower bound of the uncertainty.
    """
    f = _metric_fn(metric)
    y = np.asarray(y_true).astype(int).ravel()
    groups = [[_check(y, s)[1] for s in runs]] + ([[_check(y, s)[1] for s in others]] if others is not None else [])
    if any(len(g) == 0 for g in groups):
        raise ValueError("each configuration needs at least one run")
    n_seeds = tuple(len(g) for g in groups)
    if not _two_classes(y):
        return SeedRecordInterval(metric, float("nan"), float("nan"), float("nan"), n_seeds, int(y.sum()),
                                  int((y == 0).sum()), n_boot)
    rng = np.random.default_rng(seed)

    def mean_over_seeds(values: np.ndarray, drawn: bool) -> float:
        full = float(values.mean())
        if not drawn or values.size == 1:
            return full
        picked = float(values[rng.integers(0, values.size, values.size)].mean())
        return full + math.sqrt(values.size / (values.size - 1)) * (picked - full)

    def replicate(values: list[np.ndarray], drawn: bool) -> float:  # values: per group, the metric of each run
        means = [mean_over_seeds(v, drawn) for v in values]
        return means[0] - means[1] if len(means) == 2 else means[0]

    idx = _bootstrap_indices(y, n_boot, seed)
    if metric == "auc":  # every replicate's AUCs at once; the seeds are then drawn in the same order as below
        table = [np.stack([_bootstrap_aucs(y, run, idx) for run in g], axis=1) for g in groups]
        per_rep = ([t[k] for t in table] for k in range(n_boot))
    else:
        per_rep = ([np.array([f(y[i], run[i]) for run in g]) for g in groups] for i in idx)
    reps = np.array([replicate(v, True) for v in per_rep])
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    value = replicate([np.array([f(y, run) for run in g]) for g in groups], False)
    return SeedRecordInterval(metric, float(value), float(lo), float(hi), n_seeds,
                              int(y.sum()), int((y == 0).sum()), n_boot)


def newcombe_difference(rate_a: float, n_a: int, rate_b: float, n_b: int) -> tuple[float, float]:
    """95% interval of rate_a - rate_b by Newcombe's hybrid score method (Wilson bounds of each side), the rates
    read as proportions of n_a and n_b units: where a bootstrap or Welch cannot see the variance."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    lo, hi = confint_proportions_2indep(rate_a * n_a, n_a, rate_b * n_b, n_b, method="newcomb", compare="diff")
    return float(lo), float(hi)
