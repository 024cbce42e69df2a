import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from sklearn.linear_model import LogisticRegression

from memlens.blind import _features, blind_baseline, blind_scores
from memlens.data import synthetic
from memlens.errors import MemlensError
from memlens.metrics import auc

TEXTS = [r.text for r in synthetic.generate(400, seed=1)]


def _random_split(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat([0, 1], 200))


def test_random_splits_of_one_corpus_are_not_separated():
    # Ten random 200/200 splits of one corpus. With the Hanley-McNeil interval alone some random splits fell
    # outside it (it treats the learned scores as fixed); the relabelling SD widens it to the spread a cross-fit
    # really has: across splits the AUC's SD (about 0.04) matches the relabelling SD, and a 95% interval flags about
    # 1 split in 20 (here split 6, p = 0.048, AUC 0.567).
    results = [blind_baseline(TEXTS, _random_split(s), permutations=20) for s in range(10)]
    aucs = np.array([r["auc"] for r in results])
    assert np.all(np.abs(aucs - 0.5) < 0.16), aucs  # 4 null SDs; the length shift below gives 0.95
    assert abs(aucs.mean() - 0.5) < 0.04, aucs.mean()
    assert sum(r["shifted"] for r in results) <= 1
    assert not results[0]["shifted"] and results[0]["lo"] < 0.5 < results[0]["hi"]
    assert abs(np.mean([r["sd_null"] for r in results]) - aucs.std(ddof=1)) < 0.015  # the interval fits the spread
    assert np.mean([r["sd_null"] for r in results]) > np.mean([r["se_hanley_mcneil"] for r in results])
    inside = [r for r in results if r["lo"] <= 0.5 <= r["hi"]]
    assert len(inside) >= 7  # splits 1 and 5 fall below chance, which the cross-fit does on templated texts
    for r in inside:
        assert not r["shifted"] and r["message"].startswith("The blind baseline does not separate")
        assert r["n_members"] == r["n_nonmembers"] == 200


def test_a_length_shifted_split_is_flagged():
    order = np.argsort([len(t) for t in TEXTS], kind="stable")
    member = np.zeros(400, int)
    member[order[200:]] = 1  # members: the 200 longest texts
    res = blind_baseline(TEXTS, member)
    assert res["auc"] > 0.8 and res["lo"] > 0.5 and res["shifted"]
    assert "differ in distribution" in res["message"] and f"{res['auc']:.3f}" in res["message"]


def test_every_text_is_scored_by_a_fit_that_did_not_see_it():
    member = _random_split(0)
    scores = blind_scores(TEXTS, member, folds=5, seed=3)
    # the same folds, fitted by hand: each held-out fold's scores are exactly blind_scores'
    x = _features(TEXTS)
    for train, test in StratifiedKFold(5, shuffle=True, random_state=3).split(x, member):
        fit = LogisticRegression(C=1.0, max_iter=1000).fit(x[train], member[train])
        np.testing.assert_allclose(scores[test], fit.predict_proba(x[test])[:, 1], rtol=1e-10)
    # with random labels, a fit that saw the labels memorizes them (in-sample AUC ~0.85); the cross-fit does not
    in_sample = LogisticRegression(C=1.0, max_iter=1000).fit(x, member).predict_proba(x)[:, 1]
    assert auc(member, in_sample) > 0.75
    assert abs(auc(member, scores) - 0.5) < 0.1


def test_near_copies_on_both_sides_score_below_chance_and_are_not_a_shift():
    texts = TEXTS[:200] * 2  # each text once as a member, once as a non-member
    member = np.repeat([1, 0], 200)
    res = blind_baseline(texts, member)
    assert res["auc"] < 0.2 and res["hi"] < 0.5 and not res["shifted"]  # each copy predicted from its twin's label
    assert "below chance" in res["message"] and "not evidence" in res["message"]


@pytest.mark.parametrize("texts, member, match", [
    (TEXTS[:10], [0, 1] * 4, "10 texts but 8 member labels"),
    (TEXTS[:10], [1] * 10, "10 members and 0 non-members"),
    (TEXTS[:10], [0] * 6 + [1] * 4, "4 members and 6 non-members; each class needs at least folds=5"),
    (TEXTS[:10], [0, 2] * 5, "only 0/False"),
    ([1, 2, 3], [0, 1, 0], "texts must be strings"),
])
def test_bad_inputs_raise_memlens_errors(texts, member, match):
    with pytest.raises(MemlensError, match=match):
        blind_baseline(texts, member)
    with pytest.raises(MemlensError, match=match):
        blind_scores(texts, member)


def test_folds_must_be_at_least_two():
    with pytest.raises(MemlensError, match="folds=1"):
        blind_scores(TEXTS[:10], [0, 1] * 5, folds=1)
