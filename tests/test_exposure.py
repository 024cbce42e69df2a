import math

import numpy as np
import pytest
from scipy import special, stats

from memlens.data.records import Record
from memlens.errors import MemlensError
from memlens.exposure import (
    CanaryFormat,
    Slot,
    _skewnorm_logcdf,
    canary_format,
    draw_canaries,
    exposure,
    rank_exposure,
    skewnorm_exposure,
)

TOY = CanaryFormat("{a} took {b} for {c}.", {"a": ("a0", "a1", "a2", "a3"), "b": ("b0", "b1", "b2", "b3", "b4"),
                                              "c": ("c0", "c1", "c2", "c3", "c4", "c5")})


def _brute_rank(scores: dict[str, float], canary: str) -> float:
    """The canary's rank in R, counted one text at a time: 1 + #(strictly lower) + 0.5 * #(tied)."""
    rank = 1.0
    for text, s in scores.items():
        if text != canary:
            rank += 1.0 if s < scores[canary] else 0.5 if s == scores[canary] else 0.0
    return rank


def test_toy_format_enumerates_its_whole_space():
    texts = [TOY.render(v) for v in TOY.enumerate()]
    assert TOY.space_size == 120 == len(set(texts))
    assert TOY.log2_space == pytest.approx(math.log2(120), abs=1e-12)
    assert texts[0] == "a0 took b0 for c0." and texts[-1] == "a3 took b4 for c5."
    assert [TOY.assignment(i) for i in range(120)] == list(TOY.enumerate())
    assert all(t in TOY for t in texts)
    assert "a0 took b0 for c6." not in TOY and "a0 took b0 for c0" not in TOY
    drawn = TOY.sample(np.random.default_rng(0), 2000)
    assert all(TOY.render(v) in TOY for v in drawn)
    assert len({tuple(v.values()) for v in drawn}) == 120  # 2000 uniform draws hit all 120 (P(miss) < 1e-5)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_exposure_on_the_whole_space_is_the_enumerated_exposure(ties):
    rng = np.random.default_rng(3)
    texts = [TOY.render(v) for v in TOY.enumerate()]
    raw = rng.integers(0, 8, size=120).astype(float) if ties else rng.normal(40.0, 5.0, size=120)
    scores = dict(zip(texts, raw))
    order = sorted(texts, key=scores.get)
    for canary in {texts[0], texts[57], texts[119], order[0], order[1], order[60], order[-1]}:
        candidates = [s for t, s in scores.items() if t != canary]
        expected = math.log2(120) - math.log2(_brute_rank(scores, canary))
        assert rank_exposure(scores[canary], candidates, TOY.space_size) == expected
    if ties:  # the tied case really has ties at the canaries checked
        assert len(set(raw)) == 8
    else:
        assert rank_exposure(scores[order[0]], [scores[t] for t in order[1:]], 120) == math.log2(120)


def test_rank_exposure_is_capped_at_log2_n_plus_1_and_never_negative():
    rng = np.random.default_rng(0)
    cand = rng.normal(50.0, 5.0, size=999)
    big = 10**9
    assert rank_exposure(cand.min() - 1.0, cand, big) == math.log2(1000)  # beats all: the most 999 samples resolve
    assert rank_exposure(cand.max() + 1.0, cand, big) == 0.0  # worse than all
    assert rank_exposure(50.0, np.full(10, 50.0), big) == pytest.approx(math.log2(11 / 6))  # all tied: mid-rank 6
    assert rank_exposure(0.0, np.ones(10), space_size=4) == 2.0  # N + 1 > |R|: floored at rank 1 of R, log2 |R|
    for _ in range(200):
        n = int(rng.integers(1, 50))
        c = rng.integers(0, 5, size=n).astype(float)
        e = rank_exposure(float(rng.integers(0, 5)), c, big)
        assert 0.0 <= e <= math.log2(n + 1)
    res = exposure(cand.min() - 1.0, cand, big)
    assert res["capped"] and res["rank_exposure"] == math.log2(1000) and res["n_candidates"] == 999
    assert res["skewnorm_exposure"] > res["rank_exposure"]  # extrapolation is not capped
    mid = exposure(float(np.median(cand)), cand, big)
    assert not mid["capped"] and mid["rank_exposure"] == pytest.approx(1.0, abs=0.01)  # half the candidates better
    assert mid["skewnorm_exposure"] == skewnorm_exposure(float(np.median(cand)), cand)


def test_rank_exposure_from_a_sample_estimates_the_enumerated_exposure():
    rng = np.random.default_rng(5)
    population = np.sort(rng.normal(60.0, 8.0, size=4096))
    canary = population[99]  # rank 100 in R: exposure log2(4096/100) = 5.36 bits
    sample = rng.choice(np.delete(population, 99), size=1000, replace=False)
    assert rank_exposure(canary, sample, 4096) == pytest.approx(math.log2(4096 / 100), abs=0.5)


@pytest.mark.parametrize("shape", [-3.0, 2.0, 4.0])
def test_skewnorm_exposure_extrapolates_a_skew_normal_tail(shape):
    # 500 candidates that represent the skew-normal exactly (its quantiles i/501): no sampling noise, so this checks
    # the fit and the tail read-out. The canary sits at the population's k-in-4096 point, beyond the 500's range
    # for k = 1 and 10; its exposure in a space of 4096 is log2(4096 / k).
    cand = stats.skewnorm.ppf(np.arange(1, 501) / 501, shape, loc=60.0, scale=10.0)
    for k in (1, 10, 100):
        c = stats.skewnorm.ppf(k / 4096, shape, loc=60.0, scale=10.0)
        assert skewnorm_exposure(c, cand) == pytest.approx(math.log2(4096 / k), abs=0.6)


@pytest.mark.parametrize("seed", range(5))
def test_skewnorm_exposure_is_within_one_bit_of_the_enumerated_exposure(seed):
    # An enumerated space of 4096 skew-normal scores; the canary is the 100th best; fit on a random 500 of the rest.
    # (At ranks 1 and 10 the single canary's place is itself noisy, ~1.8 and ~0.5 bits SD, and a random 500 moves
    # the fitted tail by 1 to 3 bits: within-1-bit there holds only about half the time, so it is not asserted.)
    rng = np.random.default_rng(seed)
    population = np.sort(stats.skewnorm.rvs(2.0, loc=60.0, scale=10.0, size=4096, random_state=rng))
    sample = rng.choice(np.delete(population, 99), size=500, replace=False)
    assert skewnorm_exposure(population[99], sample) == pytest.approx(math.log2(4096) - math.log2(100), abs=1.0)


def test_skewnorm_logcdf_stays_finite_and_accurate_far_in_the_tail():
    for z in (-3.0, -12.0, -40.0, -60.0):  # shape 0 is the normal
        assert _skewnorm_logcdf(z, 0.0) == pytest.approx(special.log_ndtr(z), rel=1e-9)
    assert _skewnorm_logcdf(-60.0, -3.0) == pytest.approx(math.log(2) + special.log_ndtr(-60.0), rel=1e-6)
    for z in (-3.0, -4.5, -6.0):  # where scipy's logcdf is still accurate, on both sides of the switch (-20 nats)
        assert _skewnorm_logcdf(z, 3.0) == pytest.approx(stats.skewnorm.logcdf(z, 3.0), rel=1e-8)
    assert stats.skewnorm.logcdf(-30.0, 3.0) == -np.inf
    assert math.isfinite(_skewnorm_logcdf(-30.0, 3.0)) and _skewnorm_logcdf(-30.0, 3.0) < -4000
    cand = stats.skewnorm.rvs(3.0, loc=60.0, scale=10.0, size=500, random_state=np.random.default_rng(0))
    assert 1000 < skewnorm_exposure(-300.0, cand) < math.inf


def _rec(i, text, **fields):
    return Record(id=f"r{i}", text=text, fields={k: tuple(v) for k, v in fields.items()})


RECORDS = [
    _rec(0, "A man developed rash on aspirin 5 mg.", **{"treatment.drug": ["aspirin"], "treatment.dosage": ["5 mg"],
                                                      "effect": ["rash"], "subject.age": ["40"]}),
    _rec(1, "Warfarin 10 mg daily caused bleeding and rash.",
         **{"treatment.drug": ["Warfarin"], "treatment.dosage": ["10 mg daily"], "effect": ["bleeding", "rash"]}),
    _rec(2, "Aspirin again.", **{"treatment.drug": ["aspirin", "x" * 61, "two\nlines"], "effect": ["nausea"],
                                 "treatment.dosage": ["5 mg"]}),
]


def test_canary_format_builds_the_space_from_the_corpus():
    fmt = canary_format(RECORDS)
    assert list(fmt.slots) == ["number", "dose", "drug", "effect"]  # template order
    assert fmt.slots["drug"].values == ("Warfarin", "aspirin")  # sorted, distinct, too long / multi-line skipped
    assert fmt.slots["dose"].values == ("10 mg daily", "5 mg")
    assert fmt.slots["effect"].values == ("bleeding", "nausea", "rash")
    assert fmt.space_size == 10**6 * 2 * 2 * 3
    assert fmt.log2_space == pytest.approx(math.log2(10**6 * 12))
    assert canary_format(RECORDS, number_digits=3).space_size == 10**3 * 12
    values = draw_canaries(fmt, 5, seed=0)[0]
    text = fmt.render(values)
    assert len(values["number"]) == 6 and values["number"].isdigit()
    assert all(v in text for v in values.values())
    assert text == f"Patient {values['number']} was given {values['dose']} of {values['drug']} and developed " \
                   f"{values['effect']}."
    assert text not in {r.text for r in RECORDS} and text in fmt
    assert fmt.slots["number"].value(42) == "000042"


def test_canary_format_rejects_roles_with_fewer_than_two_values():
    thin = [_rec(0, "x", **{"treatment.drug": ["a", "b"], "treatment.dosage": ["1 mg", "1 mg"], "effect": ["e"]})]
    with pytest.raises(MemlensError, match=r"'treatment.dosage'.* 1 usable.*'effect'.* 1 usable"):
        canary_format(thin)
    with pytest.raises(MemlensError, match="'effect'"):
        canary_format([_rec(0, "x", **{"treatment.drug": ["a", "b"], "treatment.dosage": ["1", "2"],
                                       "effect": ["y" * 61, "ok"]})])


def test_canary_format_rejects_a_corpus_text_that_is_a_possible_canary():
    clash = RECORDS + [_rec(9, "Patient 123456 was given 5 mg of aspirin and developed rash.")]
    with pytest.raises(MemlensError, match=r"\['r9'\] are themselves possible canaries"):
        canary_format(clash)
    near = RECORDS + [_rec(9, "Patient 12345 was given 5 mg of aspirin and developed rash.")]  # 5 digits: not in R
    assert canary_format(near).space_size == 12 * 10**6


def test_draw_canaries_is_seeded_and_distinct():
    fmt = canary_format(RECORDS)
    a, b, c = draw_canaries(fmt, 50, seed=1), draw_canaries(fmt, 50, seed=1), draw_canaries(fmt, 50, seed=2)
    assert a == b and a != c
    assert len({fmt.render(v) for v in a}) == 50
    everything = draw_canaries(TOY, 120, seed=0)  # the whole space: every assignment once
    assert len({TOY.render(v) for v in everything}) == 120
    with pytest.raises(MemlensError, match="from 1 to 120"):
        draw_canaries(TOY, 121, seed=0)


def test_bad_inputs_raise_memlens_errors():
    with pytest.raises(MemlensError, match="at least 1 candidate"):
        rank_exposure(1.0, [], 10)
    with pytest.raises(MemlensError, match="finite"):
        rank_exposure(1.0, [1.0, np.nan], 10)
    with pytest.raises(MemlensError, match="canary_score"):
        rank_exposure(np.inf, [1.0], 10)
    with pytest.raises(MemlensError, match="space_size"):
        rank_exposure(1.0, [2.0], 0)
    with pytest.raises(MemlensError, match="all equal"):
        skewnorm_exposure(1.0, [2.0, 2.0, 2.0])
    with pytest.raises(MemlensError, match="at least 3"):
        skewnorm_exposure(1.0, [2.0, 3.0])
    with pytest.raises(MemlensError, match=r"no values given for slot\(s\) \['c'\]"):
        CanaryFormat("{a} {c}", {"a": ("x", "y")})
    with pytest.raises(MemlensError, match="do not appear"):
        CanaryFormat("{a}", {"a": ("x", "y"), "b": ("z",)})
    with pytest.raises(MemlensError, match="distinct"):
        Slot(values=("x", "x"))
    with pytest.raises(MemlensError, match="not in their slot"):
        TOY.render({"a": "a9", "b": "b0", "c": "c0"})
    with pytest.raises(MemlensError, match="unknown slot"):
        canary_format(RECORDS, template="Patient {number} got {route}.")


def test_a_run_measures_exposure_apart_from_membership(tmp_path):
    """A memorizing control: the canary copied 16 times reaches the ranking cap; exposure under the base model
    (which never saw it) stays low; canaries never enter the member/non-member records."""
    import sqlite3

    from memlens.audit import run_config
    from memlens.config import load_config

    cfg = load_config(None, ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "train.batch_size=8",
                             "audit.bootstrap=0", "audit.extraction=null", "audit.blind=false",
                             "data.members.n=16", "data.nonmembers.n=16", "train.method=full", "train.epochs=12",
                             "train.lr=3e-3", "train.warmup_steps=2", "data.canary.formatted.repeats=[1, 16]",
                             "data.canary.formatted.per_repeat=1", "audit.exposure.candidates=200",
                             f"output_dir={tmp_path}"])
    res = run_config(cfg, progress=False)
    e = res.summary["exposure"]
    assert res.summary["counts"]["train"] == 16 + 1 + 16 and res.summary["counts"]["formatted_canaries"] == 2
    by = {c["repeats"]: c for c in e["canaries"]}
    assert by[16]["rank_exposure"] == pytest.approx(math.log2(201)) and by[16]["capped"]
    assert by[16]["skewnorm_exposure"] > by[16]["base_skewnorm_exposure"] + 5
    assert by[16]["base_rank_exposure"] < 5
    from memlens.data import synthetic

    corpus = [r for recs in synthetic.load(400).values() for r in recs]
    assert e["space_bits"] == pytest.approx(math.log2(canary_format(corpus).space_size))
    with sqlite3.connect(res.store) as conn:
        ids = {r[0] for r in conn.execute("SELECT sample_id FROM samples")}
        assert len(ids) == 32 and not any(i.startswith("canary-") for i in ids)
        stored = dict(conn.execute("SELECT subject, value FROM metrics WHERE name = 'exposure'").fetchall())
    assert stored == {c["id"]: c["rank_exposure"] for c in e["canaries"]}
