import numpy as np
import pytest

from memlens.audit import run_config
from memlens.config import load_config
from memlens.errors import MemlensError

pytest.importorskip("opacus")

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "train.batch_size=8",
        "audit.bootstrap=100", "audit.extraction=null", "audit.blind=false", "lora.targets=[q, v, o]",
        "lora.rank=8"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*BASE, f"output_dir={tmp_path}", *extra])


def test_epsilon_stored_is_the_accountants_for_the_same_parameters(tmp_path):
    from opacus.accountants import RDPAccountant

    res = run_config(_cfg(tmp_path, "data.members.n=64", "data.nonmembers.n=64", "train.epochs=2",
                          "train.dp.epsilon=8"), progress=False)
    dp = res.summary["dp"]
    assert dp["sampling"] == "poisson" and dp["sample_rate"] == pytest.approx(8 / 64)
    assert dp["steps"] == 16 and res.summary["steps"] == 16  # ceil(2 epochs x 64 / 8)
    acc = RDPAccountant()
    for _ in range(dp["steps"]):
        acc.step(noise_multiplier=dp["noise_multiplier"], sample_rate=8 / 64)
    assert dp["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # the noise multiplier was found for the target: it spends about epsilon 8 (Opacus's tolerance is 0.01)
    assert 7.9 <= dp["epsilon_spent"] <= 8.0
    assert res.summary["adapter_changed"] is True and dp["adapter_moved"] is True


def test_huge_noise_gives_chance_auc_while_the_adapter_still_moves(tmp_path):
    """The positive control (8 members, many epochs, high learning rate) memorizes without DP; with noise 1000
    times the clipping norm the membership signal is gone, though the noisy steps do move the adapter."""
    args = ["data.members.n=16", "data.nonmembers.n=48", "train.epochs=40", "train.lr=1e-2", "train.warmup_steps=5"]
    plain = run_config(_cfg(tmp_path / "plain", *args), progress=False)
    assert plain.summary["attacks"]["ref_ratio"]["auc"] > 0.9
    noisy = run_config(_cfg(tmp_path / "dp", *args, "train.dp.noise_multiplier=1000"), progress=False)
    att = noisy.summary["attacks"]["ref_ratio"]
    assert att["auc_lo"] < 0.5 < att["auc_hi"]
    assert noisy.summary["adapter_changed"] is True
    # RDP's bound at this noise is limited by Opacus's largest order (alpha 255), not by the mechanism: about 0.1
    assert noisy.summary["dp"]["epsilon_spent"] < 0.2


def test_an_adapter_that_does_not_move_is_an_error(tmp_path, monkeypatch):
    # the known silent failure of Opacus with peft: the optimizer steps and nothing changes
    import opacus.optimizers

    monkeypatch.setattr(opacus.optimizers.DPOptimizer, "step", lambda self, closure=None: None)
    with pytest.raises(MemlensError, match="unchanged"):
        run_config(_cfg(tmp_path, "data.members.n=16", "data.nonmembers.n=16", "train.max_steps=3",
                        "train.dp.epsilon=8"), progress=False)


def test_dp_poisson_batches_and_reproducibility(tmp_path):
    from memlens.config import LoraConfig, TrainConfig
    from memlens.data import synthetic
    from memlens.dp import dp_train_loop
    from memlens.finetune import apply_lora
    from memlens.models import build_tiny

    def once():
        lm = build_tiny()
        seqs = lm.encode([r.text for r in synthetic.generate(80, seed=3)])
        model, _ = apply_lora(lm, LoraConfig(targets=["q", "v"], rank=4), seed=0)
        cfg = TrainConfig(batch_size=8, max_steps=30, dp={"noise_multiplier": 1.0}, warmup_steps=2)
        rows, facts = dp_train_loop(model, seqs, cfg, lm.pad_id, progress=False)
        return rows, facts, [p.detach().clone() for p in model.parameters() if p.requires_grad]

    rows, facts, w1 = once()
    sizes = np.array([r["sequences"] for r in rows])
    assert len(set(sizes.tolist())) > 3 and abs(sizes.mean() - 8) < 2.5  # random sizes around q N = 8
    assert facts["sample_rate"] == pytest.approx(0.1) and facts["steps"] == 30
    rows2, _, w2 = once()
    assert [r["sequences"] for r in rows2] == sizes.tolist()
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(w1, w2))  # same seed, same noise, same adapter


def test_dp_settings_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    import memlens.models as Mo

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Mo, "load_model", no_load)
    with pytest.raises(MemlensError, match="exactly one of epsilon"):
        _cfg(tmp_path, "train.dp.delta=1e-6")
    with pytest.raises(MemlensError, match="float32"):
        _cfg(tmp_path, "train.dp.epsilon=8", "train.precision=bfloat16")
    with pytest.raises(MemlensError, match="method=lora"):
        _cfg(tmp_path, "train.dp.epsilon=8", "train.method=full")
    with pytest.raises(MemlensError, match=r"delta: 0.05 is not below 1/N"):
        run_config(_cfg(tmp_path, "data.members.n=32", "data.nonmembers.n=32", "train.dp.epsilon=8",
                        "train.dp.delta=0.05"), progress=False)
    assert not list(tmp_path.iterdir())  # nothing written
    assert _cfg(tmp_path, "train.dp.epsilon=8").resolved()["train_precision"] == "float32"


def test_hooks_that_give_no_per_sample_gradients_are_an_error(tmp_path, monkeypatch):
    from opacus import GradSampleModule

    monkeypatch.setattr(GradSampleModule, "add_hooks", lambda self, **kw: None)
    with pytest.raises(MemlensError, match="per-sample gradient"):
        run_config(_cfg(tmp_path, "data.members.n=16", "data.nonmembers.n=16", "train.max_steps=3",
                        "train.dp.epsilon=8"), progress=False)


def test_dp_batch_larger_than_the_training_set_and_trajectories_with_early_stopping_are_refused(tmp_path):
    with pytest.raises(MemlensError, match="exceeds the 8 training sequences"):
        run_config(_cfg(tmp_path, "data.members.n=8", "data.nonmembers.n=8", "train.batch_size=16",
                        "train.dp.epsilon=8", "train.dp.delta=1e-3"), progress=False)
    with pytest.raises(MemlensError, match="use one or the other"):
        _cfg(tmp_path, "train.early_stopping.patience=2", "audit.checkpoints.every=5")
