"""A LoRA training saved while it trains and continued after an interruption gives the adapter, the losses and the
log of a training never interrupted; a state file that is not this training's is never taken, and one that is not
memlens's is never replaced."""

import json
import logging

import pytest
import torch

from memlens.audit import run_config
from memlens.config import LoraConfig, TrainConfig, load_config
from memlens.finetune import apply_lora, state_path, train_loop
from memlens.models import load_model
from memlens.training_state import TrainingState


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny")


def _seqs(lm, n=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[lm.bos_id or 1] + torch.randint(3, 200, (int(torch.randint(4, 19, (1,), generator=g)),),
                                             generator=g).tolist() for _ in range(n)]


def _train(lm, seqs, cfg, state=None, stop_after_saves=None, monkeypatch=None):
    """Train a fresh adapter (its rows and weights); with ``stop_after_saves``, raise once that many saves are done."""
    model, _ = apply_lora(lm, LoraConfig(targets=["q", "v"], rank=2, dropout=0.3), seed=cfg.seed)
    torch.manual_seed(123)  # the global state must not matter to a continued training: it is restored
    try:
        if stop_after_saves is not None:
            saves = []
            real = TrainingState.save

            def save(self, *a, **k):
                real(self, *a, **k)
                saves.append(1)
                if len(saves) == stop_after_saves:
                    raise Interrupted
            monkeypatch.setattr(TrainingState, "save", save)
            with pytest.raises(Interrupted):
                train_loop(model, seqs, cfg, lm.pad_id, progress=False, state=state)
            monkeypatch.setattr(TrainingState, "save", real)
            return None
        rows = train_loop(model, seqs, cfg, lm.pad_id, progress=False, state=state)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return rows, weights
    finally:
        model.unload()


def _same(a, b):
    rows_a, w_a = a
    rows_b, w_b = b
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_b]
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[n], w_b[n]) for n in w_a)


@pytest.mark.parametrize("settings, stop", [
    ({"batch_size": 4, "epochs": 3.0}, 9),  # in the second epoch's middle (6 batches an epoch)
    ({"batch_size": 4, "epochs": 3.0}, 6),  # at an epoch's end
    ({"batch_size": 2, "grad_accum": 3, "epochs": 2.0, "packing": False, "batching": "grouped"}, 5),
])
def test_a_continued_training_is_the_uninterrupted_one(lm, tmp_path, monkeypatch, settings, stop):
    seqs = _seqs(lm)
    cfg = TrainConfig(lr=5e-3, warmup_steps=3, seed=7, **settings)
    whole = _train(lm, seqs, cfg)
    path = tmp_path / "state.safetensors"
    _train(lm, seqs, cfg, TrainingState(path, "run-a", every_s=0), stop_after_saves=stop, monkeypatch=monkeypatch)
    assert path.is_file() and path.stat().st_mode & 0o077 == 0
    state = TrainingState(path, "run-a", every_s=0)
    again = _train(lm, seqs, cfg, state)
    assert state.resumed_from == stop and state.earlier_s > 0
    _same(whole, again)
    assert len(again[0]) > stop
    # the final state is saved too: a rerun after training (say, stopped while auditing) does not train again
    state = TrainingState(path, "run-a", every_s=1e9)
    third = _train(lm, seqs, cfg, state)
    assert state.resumed_from == len(whole[0])
    _same(whole, third)
    state.remove()
    assert not path.exists()


def test_a_state_of_other_data_or_another_training_is_not_taken(lm, tmp_path, monkeypatch, caplog):
    seqs = _seqs(lm)
    cfg = TrainConfig(lr=5e-3, warmup_steps=3, seed=7, batch_size=4, epochs=2.0)
    whole = _train(lm, seqs, cfg)
    path = tmp_path / "state.safetensors"
    # saved on other sequences, same key: training starts over (and replaces the file, this run's own)
    _train(lm, _seqs(lm, seed=1), cfg, TrainingState(path, "run-a", every_s=0), stop_after_saves=3,
           monkeypatch=monkeypatch)
    state = TrainingState(path, "run-a", every_s=1e9)
    with caplog.at_level(logging.WARNING):
        again = _train(lm, seqs, cfg, state)
    assert state.resumed_from is None and "differs in sequences" in caplog.text
    _same(whole, again)
    # another training's state (another key) is neither taken nor replaced
    other = path.read_bytes()
    state = TrainingState(path, "run-b", every_s=0)
    again = _train(lm, seqs, cfg, state)
    assert state.resumed_from is None and path.read_bytes() == other
    _same(whole, again)
    state.remove()
    assert path.read_bytes() == other


@pytest.mark.parametrize("content", [b"not a safetensors file", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", None])
def test_what_is_not_a_memlens_state_is_never_replaced(lm, tmp_path, content):
    seqs = _seqs(lm)
    cfg = TrainConfig(lr=5e-3, warmup_steps=3, seed=7, batch_size=4, epochs=1.0)
    whole = _train(lm, seqs, cfg)
    path = tmp_path / "state.safetensors"
    if content is None:
        path.mkdir()  # a folder of the user's by that name
    else:
        path.write_bytes(content)
    state = TrainingState(path, "run-a", every_s=0)
    _same(whole, _train(lm, seqs, cfg, state))
    state.remove()
    assert path.is_dir() if content is None else path.read_bytes() == content


def test_a_damaged_state_of_this_training_is_not_taken_and_a_failed_save_does_not_stop_training(
        lm, tmp_path, monkeypatch, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    seqs = _seqs(lm)
    cfg = TrainConfig(lr=5e-3, warmup_steps=3, seed=7, batch_size=4, epochs=2.0)
    whole = _train(lm, seqs, cfg)
    path = tmp_path / "state.safetensors"
    _train(lm, seqs, cfg, TrainingState(path, "run-a", every_s=0), stop_after_saves=4, monkeypatch=monkeypatch)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    damaged = {k: v for k, v in tensors.items() if not k.endswith(".exp_avg_sq")}  # a moment missing
    m = json.loads(meta["memlens"])

    def edited(**fields):
        return {"memlens": json.dumps({**m, **fields})}

    groups = [{**m["opt_groups"][0], "params": m["opt_groups"][0]["params"][::-1]}]
    for broken, why, metadata in [
            (damaged, "optimizer state", meta),
            ({**tensors, "rng.torch": tensors["rng.torch"][:10]}, "rng.torch", meta),
            (tensors, "rows", edited(rows=[{}] * m["step"])),
            (tensors, "optimizer groups", edited(opt_groups=groups)),
            (tensors, "scheduler", edited(sched={"last_epoch": 3}))]:
        save_file(broken, str(path), metadata=metadata)
        state = TrainingState(path, "run-a", every_s=1e9)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = _train(lm, seqs, cfg, state)
        assert state.resumed_from is None and f"damaged training state ({why}" in caplog.text
        _same(whole, again)
    # AdamW keeps no state for a weight that has had no gradient yet: such a state is taken
    kept = {k: v for k, v in tensors.items() if not k.startswith("opt.0.")}
    save_file(kept, str(path), metadata=edited(opt_keys={k: v for k, v in m["opt_keys"].items() if k != "0"}))
    state = TrainingState(path, "run-a", every_s=1e9)
    _train(lm, seqs, cfg, state)
    assert state.resumed_from == 4
    # a save that fails while it writes (a full disk): a warning, training goes on, and no file is left behind
    import memlens.training_state as T

    def full(fd):
        raise OSError(28, "No space left on device")

    path.unlink()
    monkeypatch.setattr(T.os, "fsync", full)
    state = TrainingState(path, "run-a", every_s=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = _train(lm, seqs, cfg, state)
    monkeypatch.undo()
    assert "No space left" in caplog.text and caplog.text.count("could not be saved") == 1
    assert list(tmp_path.iterdir()) == []
    _same(whole, again)
    # a save that cannot be written: a warning, and the training's result is the one of a training never saved
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    state = TrainingState(blocked / "state.safetensors", "run-a", every_s=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = _train(lm, seqs, cfg, state)
    assert "could not be saved" in caplog.text and caplog.text.count("could not be saved") == 1
    _same(whole, again)


def test_discard_deletes_only_this_trainings_state_and_its_leftovers(lm, tmp_path, monkeypatch):
    from memlens.training_state import discard

    seqs = _seqs(lm)
    cfg = TrainConfig(lr=5e-3, warmup_steps=3, seed=7, batch_size=4, epochs=1.0)
    path = tmp_path / "state.safetensors"
    _train(lm, seqs, cfg, TrainingState(path, "run-a", every_s=0), stop_after_saves=2, monkeypatch=monkeypatch)
    leftover = tmp_path / ".state.safetensors.tmp-x1"
    leftover.write_bytes(b"half a save")
    discard(path, "run-b")
    assert path.is_file() and not leftover.exists()
    discard(path, "run-a")
    assert not path.exists()
    path.write_bytes(b"the user's")
    discard(path, "run-a")
    assert path.read_bytes() == b"the user's"


BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=300", "data.members.n=16",
        "data.nonmembers.n=16", "train.batch_size=4", "train.epochs=2", "audit.bootstrap=0",
        "audit.extraction=null", "audit.blind=false", "audit.references.count=2", "audit.references.holdout=20",
        "audit.references.tune_records=30"]


def _interrupt(monkeypatch, key_is, after):
    """Make the ``after``-th save of a training whose key passes ``key_is`` raise, once it is written."""
    saves, real = [], TrainingState.save

    def save(self, *a, **k):
        real(self, *a, **k)
        if key_is(self.key):
            saves.append(1)
            if len(saves) == after:
                monkeypatch.setattr(TrainingState, "save", real)
                raise Interrupted

    monkeypatch.setattr(TrainingState, "save", save)


def test_an_interrupted_run_goes_on_where_its_training_stopped(tmp_path, monkeypatch, caplog):
    """Stopped while training a reference adapter, then while training its own adapter: the run, resumed twice,
    stores the numbers and the adapter of a run never stopped, and leaves no state file behind."""
    def cfg(store, *extra):
        return load_config(None, [*BASE, f"output_dir={tmp_path / store}", f"store={tmp_path / store}.sqlite",
                                  *extra])

    whole = run_config(cfg("whole"), progress=False)
    c = cfg("cut", "training_state_minutes=1e-9")
    assert c.config_hash() == whole.run_id  # not part of the run id
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEMLENS_CACHE", str(cache))  # references trained again: not the first run's
    _interrupt(monkeypatch, lambda key: key != whole.run_id, 3)  # in the first reference's training
    with pytest.raises(Interrupted):
        run_config(c, progress=False)
    assert len(list(cache.glob("references/.*.training-state.safetensors"))) == 1
    _interrupt(monkeypatch, lambda key: key == whole.run_id, 3)  # in the run's own training
    with caplog.at_level(logging.INFO, logger="memlens.training_state"), pytest.raises(Interrupted):
        run_config(c, progress=False)
    assert "training goes on from step 3 of 8" in caplog.text  # the reference's training went on
    refs = [json.loads(f.read_text()) for f in cache.glob("references/*/reference.json")]
    assert sorted(r["resumed_at_step"] or 0 for r in refs) == [0, 3]
    assert state_path(c).is_file() and not (tmp_path / "cut" / whole.run_dir.name).exists()
    assert not list(cache.glob("references/.*.training-state.safetensors"))  # the references are in the cache
    again = run_config(c, progress=False)
    assert again.summary["resumed_training_at_step"] == 3 and "resumed_training_at_step" not in whole.summary
    clock = again.summary["timings_s"]  # the earlier try's training is on the run's clock, in train_s and total_s
    assert clock["total_s"] >= clock["train_s"] + clock["score_ft_s"] + clock["attacks_s"]
    assert not state_path(c).exists()  # removed once the run's folder is written
    for key in ("steps", "first_loss", "last_loss", "train_tokens"):
        assert again.summary[key] == whole.summary[key], key
    assert again.summary["attacks"] == whole.summary["attacks"]
    assert again.summary["attacks"]["lira_offline"]["auc"] == whole.summary["attacks"]["lira_offline"]["auc"]
    ours = (again.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert ours == (whole.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    # off: nothing is saved
    off = run_config(cfg("unsaved", "training_state_minutes=0", "name=unsaved"), progress=False)
    assert off.run_id == whole.run_id and not list((tmp_path / "unsaved").glob(".memlens-training-*"))
