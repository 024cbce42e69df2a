"""Membership attacks: pure functions of per-sample statistics. A higher score means "more likely a member".

| attack        | score                                    | source                                            |
|---------------|------------------------------------------|---------------------------------------------------|
| loss          | -NLL_ft                                  | Yeom et al. 2018                                  |
| ref_ratio     | NLL_base / NLL_ft                        | Savine et al., the authors' code                   |
| ref_diff      | NLL_base - NLL_ft (log likelihood ratio) | Savine et al., the paper's formula; Carlini 2022   |
| zlib          | -NLL_ft / zlib bytes of the text         | Carlini et al. 2021                                |
| min_k         | mean of the lowest k% token log-probs    | Shi et al. 2024                                    |
| min_k_pp      | the same over standardised log-probs     | Zhang et al. 2024                                  |
| min_k_ref     | min_k(ft) - min_k(base)                  | calibrated by the base model                       |
| min_k_pp_ref  | min_k_pp(ft) - min_k_pp(base)            | calibrated by the base model                       |

NLL is the mean token NLL of the sample (BOS excluded). The base (pre-trained) model is the reference.
"""

from __future__ import annotations

import numpy as np

from memlens.scoring import SampleStats

ATTACKS = ("loss", "ref_ratio", "ref_diff", "zlib", "min_k", "min_k_pp", "min_k_ref", "min_k_pp_ref")


def attack_scores(ft: SampleStats, base: SampleStats, zlib_bytes: np.ndarray, k: float = 0.2,
                  attacks: tuple[str, ...] = ATTACKS) -> dict[str, np.ndarray]:
    """Scores of each attack for every sample; ``k`` is the Min-K% fraction."""
    out: dict[str, np.ndarray] = {}
    for name in attacks:
        if name == "loss":
            out[name] = -ft.mean_nll
        elif name == "ref_ratio":
            out[name] = base.mean_nll / np.maximum(ft.mean_nll, 1e-12)
        elif name == "ref_diff":
            out[name] = base.mean_nll - ft.mean_nll
        elif name == "zlib":
            out[name] = -ft.mean_nll / np.asarray(zlib_bytes, dtype=np.float64)
        elif name == "min_k":
            out[name] = ft.min_k[k]
        elif name == "min_k_pp":
            out[name] = ft.min_k_pp[k]
        elif name == "min_k_ref":
            out[name] = ft.min_k[k] - base.min_k[k]
        elif name == "min_k_pp_ref":
            out[name] = ft.min_k_pp[k] - base.min_k_pp[k]
        else:
            raise ValueError(f"unknown attack {name!r}: expected one of {', '.join(ATTACKS)}")
    return out


# ------------------------------------------------------------------------------------ attacks with reference adapters
#
# Inputs are per-record arrays: ``target`` (n,) holds a statistic under the audited model, ``refs`` (n, K) the same
# statistic under K reference adapters, and a boolean mask (n, K) says which references trained on which record.
# The statistic is the mean token log-likelihood, phi = -NLL (BOS excluded), which for a sequence is already on a
# log scale (the role of LiRA's logit-scaled confidence); RMIA works on its exponential p = exp(-NLL), the
# geometric-mean token probability, which lies in (0, 1).

REFERENCE_ATTACKS = ("ref_lora", "ref_lora_diff", "lira_offline", "lira_online", "rmia")


def _check_refs(target: np.ndarray, refs: np.ndarray, mask: np.ndarray | None, what: str) -> tuple:
    target = np.asarray(target, dtype=np.float64)
    refs = np.asarray(refs, dtype=np.float64)
    if refs.ndim != 2 or target.shape != (refs.shape[0],):
        raise ValueError(f"{what}: target must be (n,) and refs (n, K); got {target.shape} and {refs.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != refs.shape:
            raise ValueError(f"{what}: mask must be {refs.shape}, got {mask.shape}")
    return target, refs, mask


def _group_moments(refs: np.ndarray, mask: np.ndarray, global_variance: bool, what: str) -> tuple:
    """Per-record mean and standard deviation of the references selected by ``mask``.

    Per-record variance: sum (x - mean)^2 / (k - 1) over the record's k selected references (k >= 2). Global
    variance (LiRA's fixed-variance variant for few references): the pooled within-record variance,
    sum_i sum_j (x_ij - mean_i)^2 / sum_i (k_i - 1), the same for every record.
    """
    k = mask.sum(axis=1)
    if (k == 0).any():
        raise ValueError(f"{what}: {int((k == 0).sum())} record(s) have no reference in this group")
    mean = np.where(mask, refs, 0.0).sum(axis=1) / k
    sq = np.where(mask, (refs - mean[:, None]) ** 2, 0.0).sum(axis=1)
    if global_variance:
        dof = (k - 1).sum()
        if dof < 1:
            raise ValueError(f"{what}: the global variance needs a record with two references in the group")
        std = np.full(len(k), np.sqrt(sq.sum() / dof))
    else:
        if (k < 2).any():
            raise ValueError(f"{what}: a per-record variance needs two references per record (use the global one)")
        std = np.sqrt(sq / (k - 1))
    return mean, np.maximum(std, 1e-12)


def ref_lora(nll_target: np.ndarray, nll_refs: np.ndarray, out_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The reference attack with domain-matched references (Mireshghallah et al. 2022, "Quantifying privacy risks
    of masked language models using membership inference attacks"): the pre-trained model of ``ref_ratio`` and
    ``ref_diff`` is replaced by the reference adapters that did not train on the record.

    ``ref_lora`` = mean_OUT(NLL_ref) / NLL_target, ``ref_lora_diff`` = mean_OUT(NLL_ref) - NLL_target, with NLL the
    mean token NLL (so the difference is the paper's log-likelihood ratio per token, not per sequence, as for
    ``ref_diff``), averaged over the OUT references (a geometric mean of their token probabilities; the paper used a
    single reference). The ratio form mirrors ``ref_ratio``, the authors' code of Savine et al.
    """
    nll_target, nll_refs, out_mask = _check_refs(nll_target, nll_refs, out_mask, "ref_lora")
    k = out_mask.sum(axis=1)
    if (k == 0).any():
        raise ValueError(f"ref_lora: {int((k == 0).sum())} record(s) have no OUT reference")
    ref = np.where(out_mask, nll_refs, 0.0).sum(axis=1) / k
    return {"ref_lora": ref / np.maximum(nll_target, 1e-12), "ref_lora_diff": ref - nll_target}


def lira_offline(phi_target: np.ndarray, phi_refs: np.ndarray, out_mask: np.ndarray,
                 global_variance: bool = True) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022, "Membership inference attacks from first principles", Sec. VI-C).

    Per record, the OUT references' statistics are fitted by a Gaussian N(mu_out, sigma_out^2); the one-sided test
    Lambda = Pr[Z < phi_target], Z ~ N(mu_out, sigma_out^2), is monotone in z = (phi_target - mu_out) / sigma_out,
    which is returned (same ROC as Lambda, without its saturation at 1). Means are plain means (the paper's code
    uses medians); variances as in :func:`_group_moments` (the global one is the pooled within-record variance; the
    authors' code takes the standard deviation of all statistics together, which adds the spread between records).
    The statistic is phi = -mean NLL rather than the paper's logit of a confidence: it is already on a log scale,
    and bounded by 0 only for a sequence predicted with certainty.
    """
    phi_target, phi_refs, out_mask = _check_refs(phi_target, phi_refs, out_mask, "lira_offline")
    mu, sigma = _group_moments(phi_refs, out_mask, global_variance, "lira_offline")
    return (phi_target - mu) / sigma


def _log_normal_pdf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)


def lira_online(phi_target: np.ndarray, phi_refs: np.ndarray, in_mask: np.ndarray,
                global_variance: bool = True) -> np.ndarray:
    """Online LiRA (Carlini et al. 2022, Algorithm 1): per record, Gaussians N(mu_in, sigma_in^2) over the
    references that trained on it and N(mu_out, sigma_out^2) over those that did not; the score is the log
    likelihood ratio log N(phi_target; mu_in, sigma_in^2) - log N(phi_target; mu_out, sigma_out^2).

    With ``global_variance`` each group's variance is pooled over all records (separately for IN and OUT).
    """
    phi_target, phi_refs, in_mask = _check_refs(phi_target, phi_refs, in_mask, "lira_online")
    mu_in, s_in = _group_moments(phi_refs, in_mask, global_variance, "lira_online (IN)")
    mu_out, s_out = _group_moments(phi_refs, ~in_mask, global_variance, "lira_online (OUT)")
    return _log_normal_pdf(phi_target, mu_in, s_in) - _log_normal_pdf(phi_target, mu_out, s_out)


def rmia_marginal(p_refs: np.ndarray, out_mask: np.ndarray | None, a: float) -> np.ndarray:
    """Pr(x), the probability of a record averaged over reference models (RMIA's denominator).

    Online (``out_mask`` None: the references are a mix of IN and OUT models): the plain mean over the references,
    which is the paper's (Pr_IN(x) + Pr_OUT(x)) / 2 when each record is IN for exactly half of the references, as
    memlens's online plan makes it.
    Offline (only the OUT references of the record are used): Pr(x) = (1 + a)/2 * mean_OUT(p) + (1 - a)/2, from the
    linear approximation Pr_IN(x) = a * Pr_OUT(x) + (1 - a) of Zarifzadeh et al. 2024 (Sec. 4, "offline").
    """
    p_refs = np.asarray(p_refs, dtype=np.float64)
    if out_mask is None:
        return p_refs.mean(axis=1)
    out_mask = np.asarray(out_mask, dtype=bool)
    k = out_mask.sum(axis=1)
    if (k == 0).any():
        raise ValueError(f"rmia: {int((k == 0).sum())} record(s) have no OUT reference")
    mean_out = np.where(out_mask, p_refs, 0.0).sum(axis=1) / k
    return (1 + a) / 2 * mean_out + (1 - a) / 2


def rmia(p_target_x: np.ndarray, p_refs_x: np.ndarray, p_target_z: np.ndarray, p_refs_z: np.ndarray,
         gamma: float = 1.0, a: float = 1.0, out_mask_x: np.ndarray | None = None,
         out_mask_z: np.ndarray | None = None) -> np.ndarray:
    """RMIA (Zarifzadeh et al. 2024, "Low-cost high-power membership inference attacks", Eq. 4 and Alg. 1).

    For a record x and population records z (never trained on by the audited model),
    LR(x, z) = (p_target(x) / Pr(x)) / (p_target(z) / Pr(z)), with Pr(.) from :func:`rmia_marginal`; the score of x
    is the share of z with LR(x, z) >= gamma. Masks given: offline (Pr from the OUT references and ``a``); masks
    None: online. Probabilities are p = exp(-mean token NLL).
    """
    p_target_x, p_refs_x, _ = _check_refs(p_target_x, p_refs_x, out_mask_x, "rmia (x)")
    p_target_z, p_refs_z, _ = _check_refs(p_target_z, p_refs_z, out_mask_z, "rmia (z)")
    if p_refs_x.shape[1] != p_refs_z.shape[1]:
        raise ValueError(f"rmia: x and z must be scored by the same references ({p_refs_x.shape[1]} vs "
                         f"{p_refs_z.shape[1]})")
    if (out_mask_x is None) != (out_mask_z is None):
        raise ValueError("rmia: give the OUT masks of both x and z (offline) or of neither (online)")
    ratio_x = p_target_x / rmia_marginal(p_refs_x, out_mask_x, a)
    ratio_z = np.sort(p_target_z / rmia_marginal(p_refs_z, out_mask_z, a))
    # #{z : ratio_x / ratio_z >= gamma} = #{z : ratio_z <= ratio_x / gamma}  (every ratio is positive)
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / len(ratio_z)


def tune_rmia_a(nll_tune: np.ndarray, in_tune: np.ndarray, nll_z: np.ndarray, gamma: float = 1.0,
                grid: np.ndarray | None = None, min_members: int = 10) -> tuple[float | None, dict[float, float]]:
    """Choose RMIA's offline parameter ``a`` as its paper does: with each reference in turn as the target.

    For reference j: its members are the population records it trained on that at least one other reference did
    not (``in_tune``); its non-members the first half of the held-out records z (no reference trained on them); the
    second half serves as RMIA's z; the other references are the references. The AUC of :func:`rmia` is averaged
    over every j with at least ``min_members`` members, for each ``a`` of ``grid`` (0, 0.05, ..., 1); the best
    ``a`` is returned with the curve. ``(None, {})`` when no reference qualifies (for example when every reference
    trained on the whole population).
    """
    from memlens.metrics import auc

    grid = np.round(np.linspace(0, 1, 21), 2) if grid is None else np.asarray(grid)
    nll_tune, nll_z, in_tune = np.asarray(nll_tune), np.asarray(nll_z), np.asarray(in_tune, dtype=bool)
    k = nll_z.shape[1]
    half = len(nll_z) // 2
    z_non, z_pop = nll_z[:half], nll_z[half:]
    curves = []
    for j in range(k):
        others = [i for i in range(k) if i != j]
        if not others:
            break
        mem = in_tune[:, j] & (~in_tune[:, others]).any(axis=1)
        if mem.sum() < min_members or half < min_members:
            continue
        x = np.concatenate([nll_tune[mem], z_non])
        out_x = np.concatenate([~in_tune[mem][:, others], np.ones((half, len(others)), dtype=bool)])
        y = np.r_[np.ones(int(mem.sum())), np.zeros(half)]
        curves.append([auc(y, rmia(np.exp(-x[:, j]), np.exp(-x[:, others]), np.exp(-z_pop[:, j]),
                                   np.exp(-z_pop[:, others]), gamma, a, out_x, np.ones((len(z_pop), len(others)),
                                                                                       dtype=bool)))
                       for a in grid])
    if not curves:
        return None, {}
    mean = np.mean(curves, axis=0)
    return float(grid[int(np.argmax(mean))]), {float(a): float(v) for a, v in zip(grid, mean)}
