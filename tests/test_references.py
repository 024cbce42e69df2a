"""Reference adapters: who trains on what, trained once and reused, and what they add to an audit."""

import numpy as np
import pytest

from memlens.audit import run_config
from memlens.config import load_config
from memlens.data.records import Record
from memlens.errors import MemlensError
from memlens.references import plan

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=600", "train.batch_size=8", "audit.bootstrap=200",
        "audit.extraction=null", "data.members.n=64", "data.nonmembers.n=64", "train.epochs=10", "train.lr=1e-2",
        "lora.rank=8", "lora.targets=[q, v, o]", "audit.references.count=4", "audit.references.holdout=40",
        "audit.references.tune_records=60"]


def _records(prefix, n):
    return [Record(f"{prefix}{i}", f"{prefix} sentence number {i}") for i in range(n)]


def _plan(mode="offline", k=4, n_pool=300, n_audited=100, n_train=80, holdout=50, seed=0):
    cfg = load_config(None, [f"audit.references.mode={mode}", f"audit.references.count={k}",
                             f"audit.references.holdout={holdout}", f"audit.references.seed={seed}"])
    return plan(cfg, _records("pop", n_pool), _records("aud", n_audited), n_train, 37, "tiny")


def test_offline_references_never_train_on_an_audited_or_held_out_record():
    rp = _plan()
    z_ids = {r.id for r in rp.z}
    assert len(rp.z) == 50 and rp.in_audited.shape == (100, 4) and not rp.in_audited.any() and not rp.in_z.any()
    for records in rp.train:
        ids = {r.id for r in records}
        assert len(records) == len(ids) == 80  # the size of the run's training list
        assert all(i.startswith("pop") for i in ids) and not ids & z_ids
    assert len({tuple(sorted(r.id for r in t)) for t in rp.train}) == 4  # four different draws
    assert all(s["train"]["max_steps"] == 37 for s in rp.specs)  # as many steps as the audited run
    assert [s["train"]["seed"] for s in rp.specs] == [0, 1, 2, 3]
    # the tuning records' inclusion mask is the true one
    for rec, row in zip(rp.tune, rp.in_tune):
        assert [rec in t for t in rp.train] == row.tolist()
    assert _plan().hashes == rp.hashes and _plan(seed=1).hashes != rp.hashes


def test_a_small_population_is_used_whole_and_the_run_says_so():
    rp = _plan(n_pool=100, n_train=80, holdout=50)
    assert all(len(t) == 50 for t in rp.train)
    assert rp.notes and "fewer than the 80" in rp.notes[0]
    with pytest.raises(MemlensError, match="holdout"):
        _plan(n_pool=40, holdout=50)


def test_online_references_hold_each_audited_record_for_exactly_half():
    rp = _plan(mode="online", k=6)
    assert (rp.in_audited.sum(axis=1) == 3).all() and (rp.in_z.sum(axis=1) == 3).all()
    for j, records in enumerate(rp.train):
        ids = {r.id for r in records}
        assert {r.id for r, inc in zip(_records("aud", 100), rp.in_audited[:, j]) if inc} <= ids
        assert not any(r.id in ids for r, inc in zip(_records("aud", 100), rp.in_audited[:, j]) if not inc)


def test_reference_settings_are_checked_before_anything_runs():
    with pytest.raises(MemlensError, match="even count"):
        load_config(None, ["audit.references.mode=online", "audit.references.count=6", "audit.references.count=5"])
    with pytest.raises(MemlensError, match="even count"):
        load_config(None, ["audit.references.mode=online", "audit.references.count=2"])
    with pytest.raises(MemlensError, match="greater than or equal to 2"):
        load_config(None, ["audit.references.count=1"])
    with pytest.raises(MemlensError, match="train.method=lora"):
        load_config(None, ["audit.references.count=2", "train.method=full"])
    with pytest.raises(MemlensError, match="unknown key"):
        load_config(None, ["audit.references.cont=2"])


def test_settings_at_their_defaults_leave_run_ids_unchanged():
    # runs stored before references existed keep their ids (a study resumes into the same store)
    a = load_config(None, ["model=tiny"]).config_hash()
    d = load_config(None, ["model=tiny"]).model_dump(mode="json")
    d["audit"].pop("references")
    d["audit"].pop("blind")
    d["audit"].pop("exposure")
    d["data"]["canary"].pop("formatted")
    d["train"].pop("too_long")
    d["train"].pop("loss_average")  # packing stays: its default (on) is new behaviour, so it is in the id
    for section, key in (("audit", "checkpoints"), ("audit", "fields"), ("train", "dp"), ("train", "early_stopping")):
        assert d[section].pop(key) is None  # added later, off by default
    assert d["data"]["canary"].pop("one_run") is None
    from memlens.provenance import json_hash

    for k in ("name", "output_dir", "store", "reuse_training", "training_state_minutes"):  # they change no result
        d.pop(k)
    d["resolved"] = load_config(None, ["model=tiny"]).resolved()
    assert a == json_hash(d)
    assert load_config(None, ["model=tiny", "reuse_training=true"]).config_hash() == a
    assert load_config(None, ["model=tiny", "training_state_minutes=0"]).config_hash() == a
    assert load_config(None, ["model=tiny", "audit.references.count=2"]).config_hash() != a
    for on in ("audit.checkpoints.every=5", "audit.fields.n=8", "train.dp.epsilon=8", "train.early_stopping.patience=2",
               "data.canary.one_run.count=10"):
        assert load_config(None, ["model=tiny", on]).config_hash() != a, on


def test_domain_matched_references_find_what_the_base_model_hides_and_are_trained_once(tmp_path):
    """On the templated synthetic corpus the fine-tune learns the domain for every sentence; references trained on
    other sentences of the domain remove that and separate members better than the base model does."""
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path / 'a'}"])
    first = run_config(cfg, progress=False).summary
    ref = first["references"]
    assert ref["count"] == 4 and all(c["trained_now"] for c in ref["cost"]) and ref["train_s"] > 0
    assert ref["train_records"] == [64, 64, 64, 64]
    att = first["attacks"]
    for a in ("ref_lora", "ref_lora_diff", "lira_offline", "rmia"):
        assert a in att and a in ref["paired"]
    # better than the base model as reference: about +0.10 AUC here (0.66 against 0.56); at 64 against 64 records
    # the paired interval's lower end sits near zero (-0.004 with random batches, +0.005 with grouped ones)
    paired = ref["paired"]["ref_lora"]["auc"]
    assert paired["diff"] > 0.05 and paired["lo"] < paired["diff"] < paired["hi"]
    assert att["lira_offline"]["auc"] > att["ref_ratio"]["auc"]
    assert 0.0 <= ref["rmia_a"] <= 1.0

    # a second audit of another run with the same settings (another training seed) trains no reference
    cfg2 = load_config(None, [*BASE, f"output_dir={tmp_path / 'b'}", "train.seed=1"])
    second = run_config(cfg2, progress=False).summary
    assert not any(c["trained_now"] for c in second["references"]["cost"])
    assert second["references"]["references"] == ref["references"]
    # the same run again (another store): the same numbers, references from the cache
    again = run_config(load_config(None, [*BASE, f"output_dir={tmp_path / 'c'}"]), progress=False).summary
    for a in ("ref_lora", "lira_offline", "rmia"):
        assert again["attacks"][a]["auc"] == att[a]["auc"]


def test_online_references_store_their_inclusion_matrix(tmp_path):
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path}", "audit.references.mode=online",
                             "data.members.n=32", "data.nonmembers.n=32", "train.epochs=4"])
    s = run_config(cfg, progress=False).summary
    ref = s["references"]
    assert "lira_online" in s["attacks"] and ref["rmia_a"] is None
    assert len(ref["in_mask"]) == 64 and all(m.count("1") == 2 for m in ref["in_mask"].values())
    assert np.isfinite(s["attacks"]["lira_online"]["auc"])
