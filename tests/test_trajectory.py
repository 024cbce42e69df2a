import csv

import numpy as np
import pytest

from memlens import store as S
from memlens.audit import run_config
from memlens.config import load_config
from memlens.errors import MemlensError
from memlens.trajectory import checkpoint_steps, threshold

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "train.batch_size=8",
        "audit.bootstrap=100", "audit.extraction=null", "audit.blind=false"]


def test_checkpoint_steps_include_the_last_and_round_fractions_up():
    assert checkpoint_steps(10, every=3) == [3, 6, 9, 10]
    assert checkpoint_steps(10, every=5) == [5, 10]
    assert checkpoint_steps(10, at=[0.5, 1.0]) == [5, 10]
    assert checkpoint_steps(10, at=[0.01, 0.25]) == [1, 3, 10]
    assert checkpoint_steps(7, at=[0.5]) == [4, 7]
    assert checkpoint_steps(0, every=2) == []


def test_threshold_on_made_up_curves():
    rising = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75]
    # held-out NLL improves fast, then by less than 0.01 nats: the threshold is the checkpoint where it flattens
    h = [3.0, 2.5, 2.2, 2.198, 2.195, 2.21]
    assert threshold(h, rising, 0.01) == 2
    # a larger tolerance finds it earlier (0.5 -> 0.3 is a gain smaller than 0.35)
    assert threshold([1.0, 0.5, 0.3, 0.29], [0.5, 0.6, 0.7, 0.8], 0.35) == 1
    # utility keeps improving by more than the tolerance: no threshold
    assert threshold([3.0, 2.8, 2.6, 2.4], rising[:4], 0.01) is None
    # utility flat but the signal does not rise past it: no threshold
    assert threshold([3.0, 2.5, 2.5, 2.5], [0.5, 0.7, 0.7, 0.7], 0.01) is None
    # worse from the first checkpoint on, while the signal rises: the very first checkpoint
    assert threshold([2.0, 2.1, 2.3], [0.5, 0.6, 0.7], 0.0) == 0
    # a dip later counts: after checkpoint 1 the NLL still improves by 0.2, so the threshold is later
    assert threshold([3.0, 2.5, 2.5, 2.3, 2.3], [0.5, 0.6, 0.7, 0.8, 0.9], 0.01) == 3
    with pytest.raises(ValueError):
        threshold([1.0, 2.0], [0.5], 0.01)


def test_checkpoints_config_needs_exactly_one_schedule():
    with pytest.raises(MemlensError, match="exactly one of every"):
        load_config(None, ["audit.checkpoints.tolerance=0.1"])
    with pytest.raises(MemlensError, match="exactly one of every"):
        load_config(None, ["audit.checkpoints.every=2", "audit.checkpoints.at=[0.5]"])
    with pytest.raises(MemlensError, match=r"\(0, 1\]"):
        load_config(None, ["audit.checkpoints.at=[0.5, 1.5]"])
    with pytest.raises(MemlensError, match="checkpoints.signal"):
        load_config(None, ["audit.checkpoints.every=2", "audit.checkpoints.signal=lira"])
    # off by default, and off leaves run ids unchanged
    assert load_config(None, []).config_hash() == load_config(None, ["audit.checkpoints=null"]).config_hash()


def _trajectory(conn, run_id):
    header, rows = S.checkpoint_table(conn, run_id)
    return [dict(zip(header, r)) for r in rows]


def test_trajectory_rises_on_the_positive_control_and_ends_at_the_final_audit(tmp_path):
    """A rank-8 adapter on 8 members for 60 steps memorizes them: the loss attack's AUC rises with the steps; the
    last checkpoint is the trained model, so its numbers are the final audit's."""
    args = [*[b for b in BASE if b != "audit.extraction=null"], f"output_dir={tmp_path}", "data.members.n=8",
            "data.nonmembers.n=32", "lora.targets=[q, v, o]", "lora.rank=8", "train.max_steps=60", "train.lr=3e-3",
            "train.warmup_steps=5", "audit.extraction.n=8"]
    res = run_config(load_config(None, [*args, "audit.checkpoints.every=15", "audit.checkpoints.signal=loss",
                                        "audit.checkpoints.extraction=true"]), progress=False)
    conn = S.connect(res.store)
    rows = _trajectory(conn, res.run_id)
    auc = {r["step"]: r["value"] for r in rows if r["name"] == "auc" and r["subject"] == "loss"}
    assert sorted(auc) == [0, 15, 30, 45, 60]
    assert auc[60] > auc[30] > auc[15] > auc[0] and auc[60] > 0.95 and auc[0] < 0.7  # (0.57 0.87 0.97 0.99 0.99)
    nll = {r["step"]: r["value"] for r in rows if r["name"] == "members_nll"}
    assert nll[60] < nll[30] < nll[0]
    # the last checkpoint is the final model, scored the same way: the same AUCs as the audit
    for attack, stats in res.summary["attacks"].items():
        last = next(r for r in rows if r["step"] == 60 and r["name"] == "auc" and r["subject"] == attack)
        assert last["value"] == pytest.approx(stats["auc"], abs=1e-9), attack
    heldout = next(r for r in rows if r["step"] == 60 and r["name"] == "heldout_ppl")
    assert heldout["value"] == pytest.approx(res.summary["perplexity"]["heldout_ft"], rel=1e-9)
    # the training loss at a checkpoint is the token-weighted mean of the log's steps since the one before
    loss = {r["step"]: r["value"] for r in rows if r["name"] == "train_loss"}
    assert 0 not in loss and loss[60] < loss[15]
    thr = res.summary["trajectory"]["threshold"]
    assert thr["attack"] == "loss" and thr["checkpoints"] == 5
    # the export carries the trajectory
    out = S.export(conn, res.run_id, "csv", tmp_path / "t.csv", table="checkpoints")
    exported = list(csv.DictReader(open(out)))
    assert len(exported) == len(rows) and exported[0].keys() == {"step", "epoch", "name", "subject", "value", "lo",
                                                                   "hi"}
    # extraction at the checkpoints after step 0: members' continuations come closer to their suffixes
    share = {r["step"]: r["value"] for r in rows
             if r["name"] == "extraction:ngram_share" and r["subject"] == "difference"}
    assert sorted(share) == [15, 30, 45, 60] and share[60] > share[15]
    # checkpoints leave the training's random state alone (generation forks it): the same training without them
    plain = run_config(load_config(None, [*args, "output_dir=" + str(tmp_path / "plain")]), progress=False)
    assert plain.summary["last_loss"] == res.summary["last_loss"]
    assert plain.summary["attacks"]["loss"]["auc"] == res.summary["attacks"]["loss"]["auc"]


def test_trajectory_with_lora_under_bf16_scores_the_model_as_loaded(tmp_path):
    """Under bf16 autocast the frozen weights are held in bf16 while training; a checkpoint sees them as loaded (a
    float32 audit would otherwise fail on mixed dtypes), and training goes on unchanged after it."""
    args = [*BASE, f"output_dir={tmp_path}", "data.members.n=16", "data.nonmembers.n=16", "train.max_steps=6",
            "train.precision=bfloat16", "audit.precision=float32", "lora.targets=[q, v]"]
    res = run_config(load_config(None, [*args, "audit.checkpoints.at=[0.5]"]), progress=False)
    rows = _trajectory(S.connect(res.store), res.run_id)
    assert sorted({r["step"] for r in rows}) == [0, 3, 6]
    # step 0 is the base model: every reference-calibrated score ties
    assert next(r["value"] for r in rows if r["step"] == 0 and r["subject"] == "ref_ratio" and r["name"] == "auc") \
        == 0.5
    plain = run_config(load_config(None, [*args, f"output_dir={tmp_path / 'plain'}"]), progress=False)
    assert plain.summary["last_loss"] == res.summary["last_loss"]
    assert np.isfinite([r["value"] for r in rows if r["name"] != "tpr@0.01"]).all()
    # a run without a trajectory has none to export: an error, not an empty file
    with pytest.raises(MemlensError, match="ran without audit.checkpoints"):
        S.export(S.connect(plain.store), plain.run_id, "csv", tmp_path / "none.csv", table="checkpoints")
    assert not (tmp_path / "none.csv").exists()
    # memlens audit does not train: checkpoints there are refused before anything loads
    from memlens.audit import audit_adapter
    from memlens.config import AuditConfig

    with pytest.raises(MemlensError, match="does not train"):
        audit_adapter("tiny", None, "m.jsonl", "n.jsonl", AuditConfig(checkpoints={"every": 2}), db=tmp_path / "a.db")
