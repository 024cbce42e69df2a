import numpy as np
import pytest

from memlens.frontier import factor_table, least_leakage, pareto_front


def test_pareto_front_by_brute_force():
    # (perplexity, auc): b dominates c; d is the lowest perplexity; a the lowest leakage; e equals b (both kept)
    u = [12.0, 10.0, 11.0, 9.0, 10.0]
    l = [0.52, 0.60, 0.65, 0.70, 0.60]
    assert pareto_front(u, l).tolist() == [True, True, False, True, True]
    rng = np.random.default_rng(0)
    for _ in range(20):
        u, l = rng.random(15), rng.random(15)
        brute = [not any(u[j] <= u[i] and l[j] <= l[i] and (u[j] < u[i] or l[j] < l[i]) for j in range(15))
                 for i in range(15)]
        assert pareto_front(u, l).tolist() == brute


def test_least_leakage_at_a_utility_names_the_runs_it_cannot_tell_apart():
    runs = [{"name": "a", "heldout_ppl": 12.0, "auc": 0.52, "auc_lo": 0.48, "auc_hi": 0.56},
            {"name": "b", "heldout_ppl": 10.0, "auc": 0.60, "auc_lo": 0.56, "auc_hi": 0.64},
            {"name": "c", "heldout_ppl": 10.5, "auc": 0.62, "auc_lo": 0.58, "auc_hi": 0.66},
            {"name": "d", "heldout_ppl": 9.0, "auc": 0.70, "auc_lo": 0.66, "auc_hi": 0.74}]
    out = least_leakage(runs, max_perplexity=11.0)
    assert out["best"]["name"] == "b" and out["eligible"] == 3
    assert [r["name"] for r in out["tied"]] == ["c"]  # 0.58 <= 0.64: the intervals overlap; d's does not
    assert least_leakage(runs, 13.0)["best"]["name"] == "a"
    assert least_leakage(runs, 8.0)["best"] is None


def _made_up_runs(seeds=3, noise=0.003, seed=1):
    """AUC = 0.60 + 0.05 [v] + 0.10 [q+k+v+o] + 0.02 [rank 4] - 0.08 [dp 1], with seed noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for targets, t_eff in (("q", 0.0), ("v", 0.05), ("q+k+v+o", 0.10)):
        for rank, r_eff in ((1, 0.0), (4, 0.02)):
            for dp, d_eff in (("off", 0.0), ("1", -0.08)):
                for seed in range(seeds):
                    runs.append({"targets": targets, "rank": rank, "dp": dp, "seed": seed,
                                 "auc": 0.60 + t_eff + r_eff + d_eff + rng.normal(0, noise)})
    return runs


def test_factor_table_recovers_known_effects():
    pytest.importorskip("statsmodels")
    truth = {("targets", "v"): 0.05, ("targets", "q+k+v+o"): 0.10, ("rank", "4"): 0.02, ("dp", "1"): -0.08}
    out = factor_table(_made_up_runs(), ["targets", "rank", "dp"], "auc")
    rows = {(r["axis"], r["level"]): r for r in out["rows"]}
    assert set(rows) == set(truth)
    for key, effect in truth.items():
        # the standard error of a level's effect is about 0.003 x sqrt(2 / 12) = 0.0012
        assert rows[key]["effect"] == pytest.approx(effect, abs=0.005), key
        assert rows[key]["hi"] - rows[key]["lo"] < 0.01
    assert rows[("dp", "1")]["reference"] == "off" and rows[("rank", "4")]["reference"] == "1"
    assert out["n"] == 36 and out["resid_df"] == 36 - 5
    # the 95% intervals cover the true effects about 95% of the time
    hits = []
    for seed in range(50):
        fit = factor_table(_made_up_runs(seed=100 + seed), ["targets", "rank", "dp"], "auc")
        hits += [r["lo"] < truth[(r["axis"], r["level"])] < r["hi"] for r in fit["rows"]]
    assert len(hits) == 200 and 0.88 <= np.mean(hits) <= 0.99


def test_factor_table_refuses_a_fit_without_residual_degrees_of_freedom():
    pytest.importorskip("statsmodels")
    runs = [r for r in _made_up_runs(seeds=1) if r["dp"] == "off"]  # 6 runs, 4 coefficients
    out = factor_table(runs, ["targets", "rank"], "auc")
    assert out["rows"] == [] and "2 residual degrees of freedom" in out["note"]
    # an axis with one level is left out rather than fitted
    out = factor_table(_made_up_runs(), ["targets", "rank", "dp"], "auc")
    one = factor_table([r for r in _made_up_runs() if r["rank"] == 1], ["targets", "rank", "dp"], "auc")
    assert "rank" in out["axes"] and "rank" not in one["axes"]


def test_factor_table_refuses_axes_that_vary_together_and_drops_missing_outcomes():
    runs = [r for r in _made_up_runs() if r["dp"] == "off"]
    for r in runs:
        r["lr"] = "1e-3" if r["rank"] == 1 else "2e-3"  # lr and rank always change together
    out = factor_table(runs, ["targets", "rank", "lr"], "auc")
    assert out["rows"] == [] and "vary together" in out["note"]
    runs = _made_up_runs()
    runs[0]["auc"] = float("nan")
    runs[1]["auc"] = None
    out = factor_table(runs, ["targets", "rank", "dp"], "auc")
    assert out["n"] == 34 and out["resid_df"] == 34 - 5 and len(out["rows"]) == 4


def test_points_without_a_number_are_on_no_frontier():
    assert pareto_front([1.0, float("nan"), 2.0], [0.5, 0.1, 0.4]).tolist() == [True, False, True]
    runs = [{"name": "a", "heldout_ppl": 10.0, "auc": float("nan"), "auc_lo": 0.0, "auc_hi": 1.0},
            {"name": "b", "heldout_ppl": 10.0, "auc": 0.6, "auc_lo": 0.55, "auc_hi": 0.65}]
    assert least_leakage(runs, 11.0)["best"]["name"] == "b"
