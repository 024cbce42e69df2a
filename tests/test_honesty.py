"""A report or summary never claims more than its numbers: canaries apart, no circular correlation, intervals and n
beside every difference, no fit on a handful of points, error bars on per-run points."""

import sqlite3

import numpy as np
import pytest

from memlens import metrics as M
from memlens.audit import run_config
from memlens.config import load_config
from memlens.report import figures as F


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("honest")
    cfg = load_config(None, ["model=tiny", "data.source=synthetic", "data.synthetic_size=300", "data.members.n=24",
                             "data.nonmembers.n=24", "data.canary.repeats=6", "data.canary.count=2",
                             "train.batch_size=8", "train.epochs=6", "train.lr=1e-2", "audit.bootstrap=50",
                             "audit.extraction.n=8", "audit.blind=false", f"output_dir={tmp}"])
    return run_config(cfg, progress=False)


def test_canaries_never_enter_the_member_vs_non_member_auc(canary_run):
    s = canary_run.summary
    canaries = set(s["canaries"])
    assert len(canaries) == 2 and all(c["copies"] == 6 for c in s["canaries"].values())
    with sqlite3.connect(canary_run.store) as conn:
        rows = conn.execute('SELECT s.sample_id, s.member, v.value FROM samples s JOIN "values" v ON '
                            "v.run_id = s.run_id AND v.sample_id = s.sample_id AND v.name = 'score_ref_ratio'").fetchall()
        ranks = conn.execute("SELECT subject, value FROM metrics WHERE name = 'canary:fpr_rank'").fetchall()
    assert canaries <= {r[0] for r in rows}  # stored, scored ...
    kept = [r for r in rows if r[0] not in canaries]
    y, sc = np.array([r[1] for r in kept]), np.array([r[2] for r in kept])
    assert s["attacks"]["ref_ratio"]["auc"] == pytest.approx(M.auc(y, sc), abs=1e-12)  # ... but not counted
    assert s["n_members"] == int(y.sum()) and s["n_nonmembers"] == int((1 - y).sum())
    # each canary's rank: the share of non-members scored at least as high
    non = sc[y == 0]
    for subject, value in ranks:
        attack, cid = subject.rsplit(":", 1)
        if attack == "ref_ratio":
            own = next(r[2] for r in rows if r[0] == cid)
            assert value == pytest.approx(float((non >= own).mean()))
    # extraction: canaries apart, the difference with its n and interval
    for e in s["extraction"]:
        assert e["n_canaries"] == 2 and e["n_members"] == 8 and e["n_nonmembers"] == 8
        if e["difference_by"] == "none":  # a count without variation: no interval rather than (d, d)
            assert e["measure"] == "prefix_match" and e["difference_lo"] != e["difference_lo"]
        else:
            assert e["difference_lo"] <= e["difference"] <= e["difference_hi"]


def test_no_correlation_that_holds_by_construction(canary_run):
    with sqlite3.connect(canary_run.store) as conn:
        subjects = {r[0] for r in conn.execute("SELECT subject FROM metrics WHERE name IN ('pearson', 'spearman')")}
    assert not any(s.startswith("score_") for s in subjects), subjects  # loss vs ppl_ft is -1 by definition


def test_no_fit_on_a_handful_of_points_and_n_beside_any_r2():
    rng = np.random.default_rng(0)
    few = F.memorization_vs_perplexity(rng.random(4), rng.random(4) * 10, rng.random(4) * 10, "canaries")
    assert not any(line.get_label().startswith("fit") for ax in few.axes for line in ax.lines)
    assert "too few points" in few.axes[0].texts[0].get_text()
    many = F.memorization_vs_perplexity(rng.random(30), rng.random(30) * 10, rng.random(30) * 10, "members")
    labels = [line.get_label() for ax in many.axes for line in ax.lines if line.get_label().startswith("fit")]
    assert len(labels) == 2 and all("n = 30" in lab and "95% CI" in lab for lab in labels)


def test_every_per_run_point_has_error_bars():
    fig = F.privacy_vs_utility([("Q r1", 40.0, (38.0, 42.5), 0.61, 0.57, 0.65), ("V r1", 30.0, (29.0, 31.0), 0.58,
                                                                                   0.54, 0.62)])
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 2 and all(b.has_xerr and b.has_yerr for b in bars)
    assert ax.get_ylim()[0] <= 0.5  # the axis shows chance, not a zoom on differences inside the error bars
