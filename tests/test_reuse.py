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


def test_an_audit_only_change_reuses_the_adapter_and_gives_the_numbers_of_training_again(tmp_path):
    first = _run(tmp_path)
    again = _run(tmp_path, "audit.ks=[0.2]", "reuse_training=true")  # another audit of the same training
    fresh = _run(tmp_path, "audit.ks=[0.2]", "name=fresh", store="fresh.sqlite")  # the same run, trained again
    assert again.run_id == fresh.run_id != first.run_id  # reuse_training is not part of the run id
    used = again.summary["reused_training"]
    assert used["run"] == first.run_dir.name and used["run_id"] == first.run_id
    assert "reused_training" not in fresh.summary
    assert again.summary["timings_s"]["train_s"] == 0.0
    for key in ("steps", "first_loss", "last_loss", "train_tokens", "trainable_params"):
        assert again.summary[key] == first.summary[key] == fresh.summary[key], key
    assert _values(again.store, again.run_id) == _values(fresh.store, fresh.run_id) != []
    ours = (again.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert ours == (fresh.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_another_training_or_a_folder_that_is_not_what_it_says_is_never_reused(tmp_path):
    first = _run(tmp_path)
    other_seed = _run(tmp_path, "train.seed=1", "reuse_training=true")
    assert "reused_training" not in other_seed.summary
    # a copy of the first run's folder whose config.yaml was changed to claim another training: its summary's run id
    # no longer matches its config, so it is passed over (and the original, of another training, too)
    fake = tmp_path / "runs" / "aaa-fake"
    shutil.copytree(first.run_dir, fake)
    cfg = yaml.safe_load((fake / "config.yaml").read_text())
    cfg["lora"]["rank"] = 2
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
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
                                   ["train.early_stopping.patience=2"]])
def test_reuse_of_a_training_whose_facts_come_from_training_itself_is_refused(tmp_path, extra):
    with pytest.raises(MemlensError, match="reuse_training"):
        load_config(None, [*BASE, "reuse_training=true", *extra])
