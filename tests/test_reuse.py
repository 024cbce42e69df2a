"""reuse_training: a run whose training is an earlier run's audits that run's adapter, with the numbers training again
would give, and nothing else is ever taken for it."""

import json
import shutil
import sqlite3

import pytest
import yaml

from memlens.audit import run_config
from memlens.config import load_config
from memlens.errors import MemlensError

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=300", "data.members.n=16",
        "data.nonmembers.n=16", "train.batch_size=8", "train.max_steps=4", "audit.bootstrap=0",
        "audit.extraction=null", "audit.blind=false"]


def _values(store, run_id):
    conn = sqlite3.connect(store)
    try:
        return sorted(conn.execute('SELECT sample_id, name, value FROM "values" WHERE run_id=?', (run_id,)))
    finally:
        conn.close()


def _run(tmp_path, *extra, store="s.sqlite"):
    return run_config(load_config(None, [*BASE, f"output_dir={tmp_path / 'runs'}", f"store={tmp_path / store}",
                                         *extra]), progress=False)


REFS = ["audit.references.count=2", "audit.references.holdout=20", "audit.references.tune_records=30"]


def test_an_audit_only_change_reuses_the_adapter_and_gives_the_numbers_of_training_again(tmp_path):
    first = _run(tmp_path, "name=b-first")
    # another audit of the same training, with reference adapters trained (and scored) before the adapter is loaded
    again = _run(tmp_path, *REFS, "name=a-again", "reuse_training=true")
    fresh = _run(tmp_path, *REFS, "name=fresh", store="fresh.sqlite")  # the same run, trained again
    assert again.run_id == fresh.run_id != first.run_id  # reuse_training is not part of the run id
    used = again.summary["reused_training"]
    assert used["run"] == "b-first" and used["run_id"] == first.run_id
    assert used["train_s"] == pytest.approx(first.summary["timings_s"]["train_s"], abs=1e-3) and used["train_s"] > 0
    assert "reused_training" not in fresh.summary
    assert again.summary["timings_s"]["train_s"] == 0.0
    for key in ("steps", "first_loss", "last_loss", "train_tokens", "trainable_params"):
        assert again.summary[key] == first.summary[key], key
    assert again.summary["train_tokens_per_s"] == pytest.approx(first.summary["train_tokens_per_s"], rel=1e-12)
    for key in ("steps", "first_loss", "last_loss", "train_tokens", "trainable_params"):
        assert again.summary[key] == fresh.summary[key], key
    assert _values(again.store, again.run_id) == _values(fresh.store, fresh.run_id) != []
    assert again.summary["attacks"]["lira_offline"] == fresh.summary["attacks"]["lira_offline"]
    ours = (again.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert ours == (fresh.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    # a folder that reused is never a source (its clocks are not a training's), and what cannot be read is passed over
    bad = tmp_path / "runs" / "0-bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{")
    (bad / "config.yaml").write_text("model: [")
    (tmp_path / "runs" / ".a-again.tmp-x").mkdir()
    third = _run(tmp_path, "audit.ks=[0.3]", "reuse_training=true")
    assert third.summary["reused_training"]["run"] == "b-first"


def test_another_training_or_a_folder_that_is_not_what_it_says_is_never_reused(tmp_path):
    first = _run(tmp_path)
    other_seed = _run(tmp_path, "train.seed=1", "reuse_training=true")
    assert "reused_training" not in other_seed.summary
    # a copy of the first run's folder whose config.yaml and summary.json were both changed to claim rank 2: its
    # adapter (rank 1) is not what that config trains, so it is passed over
    fake = tmp_path / "runs" / "aaa-fake"
    shutil.copytree(first.run_dir, fake)
    cfg = yaml.safe_load((fake / "config.yaml").read_text())
    cfg["lora"]["rank"] = 2
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = json.loads((fake / "summary.json").read_text())
    summary["config_hash"] = load_config(None, [*BASE, "lora.rank=2"]).config_hash()
    (fake / "summary.json").write_text(json.dumps(summary))
    ranked = _run(tmp_path, "lora.rank=2", "reuse_training=true")
    assert "reused_training" not in ranked.summary
    # a complete copy with the adapter of another base model (its recorded fingerprint differs) is passed over too
    shutil.rmtree(fake)
    shutil.copytree(first.run_dir, fake)
    base = json.loads((fake / "adapter" / "memlens_base.json").read_text())
    (fake / "adapter" / "memlens_base.json").write_text(json.dumps({**base, "fingerprint": "0" * 64}))
    shutil.rmtree(first.run_dir)
    third = _run(tmp_path, "audit.ks=[0.3]", "reuse_training=true")
    assert "reused_training" not in third.summary


@pytest.mark.parametrize("extra", [["train.method=full"], ["audit.checkpoints.every=2"],
                                   ["train.early_stopping.patience=2"], ["train.dp.epsilon=8"]])
def test_reuse_of_a_training_whose_facts_come_from_training_itself_is_refused(tmp_path, extra):
    with pytest.raises(MemlensError, match="reuse_training"):
        load_config(None, [*BASE, "reuse_training=true", *extra])


def test_finetune_refuses_reuse_training(tmp_path):
    from memlens.finetune import finetune

    with pytest.raises(MemlensError, match="memlens finetune always trains"):
        finetune(load_config(None, [*BASE, "reuse_training=true", f"output_dir={tmp_path}"]), progress=False)
    assert not any(tmp_path.iterdir())


def test_an_adapter_whose_modules_peft_wrote_as_suffixes_is_still_found(tmp_path, monkeypatch):
    # peft writes adapter_config.json's target_modules as suffixes from 20 modules on (SmolLM2-135M's 30 q_proj become
    # ["q_proj"]); the tiny model has 2 layers, so peft's threshold is lowered to make it do so here
    monkeypatch.setattr("peft.tuners.tuners_utils.MIN_TARGET_MODULES_FOR_OPTIMIZATION", 2)
    first = _run(tmp_path, "name=first", "lora.targets=[q,v]")
    written = json.loads((first.run_dir / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(written) == ["q_proj", "v_proj"]
    again = _run(tmp_path, "lora.targets=[q,v]", "audit.ks=[0.3]", "reuse_training=true")
    assert again.summary["reused_training"]["run"] == "first"
    assert "reused_training" not in _run(tmp_path, "lora.targets=[q]", "reuse_training=true").summary
