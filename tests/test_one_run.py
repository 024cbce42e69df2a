import math

import numpy as np
import pytest
from scipy import stats

from memlens.one_run import audit, epsilon_lower_bound, guesses, p_value


@pytest.mark.parametrize("r", [1, 5, 20, 100])
def test_perfect_guesses_give_the_closed_form(r):
    # v = r, delta = 0: p^r = beta at the bound, eps = log(p / (1 - p)) with p = beta^(1/r)
    p = 0.05 ** (1 / r)
    expected = math.log(p / (1 - p))
    got = epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0, confidence=0.95)
    assert got == pytest.approx(max(expected, 0.0), abs=1e-5)


def test_without_delta_the_p_value_is_the_binomial_tail():
    for r, v, eps in ((50, 40, 1.0), (200, 120, 0.3), (10, 10, 4.0), (30, 0, 2.0)):
        p = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(500, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, p), rel=1e-12)


def test_the_bound_is_where_the_tail_crosses_the_level():
    m, r, v = 1000, 200, 150
    eps = epsilon_lower_bound(m, r, v)
    assert p_value(m, r, v, eps - 1e-4, 0.0) < 0.05 <= p_value(m, r, v, eps + 1e-4, 0.0)


def test_delta_by_brute_force_and_it_only_lowers_the_bound():
    m, r, v, eps, delta = 100, 40, 30, 0.5, 1e-3
    p = 1 / (1 + math.exp(-eps))
    f = [1.0 if u <= 0 else sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(u, r + 1))
         for u in range(v + 1)]
    # max over i of (f(v - i) - f(v)) / i, by the definition (i beyond v adds nothing larger)
    brute = f[v] + 2 * m * delta * max((f[v - i] - f[v]) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(brute, 1.0), rel=1e-9)
    assert epsilon_lower_bound(m, r, v, delta=1e-3) < epsilon_lower_bound(m, r, v, delta=0.0)
    assert epsilon_lower_bound(m, r, v, delta=1e-5) <= epsilon_lower_bound(m, r, v, delta=0.0)


def test_chance_guesses_give_no_bound_and_guessing_counts_right():
    assert epsilon_lower_bound(1000, 100, 50) == 0.0
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    included = [True, True, False, True, False, False]
    assert guesses(scores, included, 2) == (4, 4)  # top two in, bottom two out: all right
    assert guesses(scores, included, 3) == (6, 4)  # third highest is out, third lowest is in
    assert guesses(scores, included, 10) == (6, 4)  # at most half of the canaries each way
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)


def test_audit_of_a_perfectly_separated_run():
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    base = rng.normal(3.0, 0.2, 200)
    ft = base - np.where(included, 1.0, 0.0)  # members lose one nat, the others nothing
    out = audit(base, ft, included, k=20, delta=0.0)
    assert out["guesses"] == 40 and out["correct"] == 40 and out["m"] == 200
    assert out["epsilon_lb"] == pytest.approx(epsilon_lower_bound(200, 40, 40), abs=1e-9)
    null = audit(base, base + rng.normal(0, 0.01, 200), included, k=20, delta=0.0)
    assert null["epsilon_lb"] < 1.0


def test_one_run_canaries_in_a_memorizing_run(tmp_path):
    from memlens.audit import run_config
    from memlens.config import load_config

    cfg = load_config(None, ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "train.batch_size=8",
                             f"output_dir={tmp_path}", "data.members.n=8", "data.nonmembers.n=16",
                             "train.method=full", "train.epochs=30", "train.lr=1e-2", "train.warmup_steps=5",
                             "audit.extraction=null", "audit.blind=false", "audit.bootstrap=50",
                             "data.canary.one_run.count=40", "data.canary.one_run.guesses=6"])
    from memlens.data import load_corpus, make_split

    split = make_split(load_corpus(cfg.data), cfg.data)
    included = [inc for _, inc in split.one_run]
    assert len(included) == 40 and 10 <= sum(included) <= 30
    # the included canaries are in the training list once each; the others nowhere; none is audited
    train_ids = [r.id for r in split.train]
    for rec, inc in split.one_run:
        assert train_ids.count(rec.id) == (1 if inc else 0)
    assert not {r.id for r, _ in split.one_run} & {r.id for r in (*split.members, *split.nonmembers)}
    assert split.manifest["one_run_canaries"] == {r.id: inc for r, inc in split.one_run}
    res = run_config(cfg, progress=False)
    one = res.summary["one_run"]
    assert one["m"] == 40 and one["guesses"] == 12 and one["included"] == sum(included)
    assert one["correct"] >= 11  # a memorizing run: (nearly) every guess right
    assert one["epsilon_lb"] == pytest.approx(epsilon_lower_bound(40, 12, one["correct"], 0.0), abs=1e-9)
    assert one["epsilon_lb"] > 0.5
