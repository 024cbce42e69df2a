"""The benchmark's baseline pieces compute what memlens computes, and the benchmark runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memlens.models import build_tiny
from memlens.scoring import score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from baseline import per_sample_stats  # noqa: E402

TEXTS = ["A 45-year-old woman developed acute hepatitis after amiodarone 200 mg daily.",
         "Carbamazepine-induced rash in a child.", "x y", "OBJECTIVE: To report 2 cases of serotonin syndrome."]


def test_baseline_statistics_equal_memlens_statistics():
    lm = build_tiny()
    seqs = lm.encode(TEXTS)
    ks = (0.1, 0.2, 0.5)
    ours = score(lm.model, seqs, batch_size=3, pad_id=lm.pad_id, ks=ks, min_k_pp=True, starts=[1, 3, 1, 2])
    base = per_sample_stats(lm.model, seqs, ks=ks, min_k_pp=True, starts=[1, 3, 1, 2])
    assert np.array_equal(ours.n_tokens, base.n_tokens)
    assert np.allclose(ours.sum_nll, base.sum_nll, atol=1e-4)
    for k in ks:
        assert np.allclose(ours.min_k[k], base.min_k[k], atol=1e-5)
        assert np.allclose(ours.min_k_pp[k], base.min_k_pp[k], atol=1e-4)


def test_bench_quick_runs_end_to_end_on_the_tiny_model(tmp_path, phee_dir):
    out = tmp_path / "performance.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--model", "tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "MEMLENS_PHEE_DIR": str(phee_dir)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON line, nothing else on stdout
    res = json.loads(lines[0])
    assert set(res["goals"]) == {"scoring_10x", "scoring_60pct_roof", "extraction_10x", "training_2x", "study_3x",
                                 "training_40pct_roof"}
    assert res["processor"]["model"] and isinstance(res["processor"]["isa"], list)
    tr = res["training"]
    for k in ("train", "heldout"):  # the fit against the Trainer: means and spreads over the two seeds
        ours = [r[k] for r in tr["runs"]["memlens"]]
        assert len(ours) == 2 and tr["fit"]["memlens"][k]["mean"] == pytest.approx(np.mean(ours))
        assert tr["fit"]["memlens"][k]["spread"] == pytest.approx(max(ours) - min(ours))
        assert tr[f"{k}_within_spread"] == (abs(tr[f"{k}_nll_diff"]) <= tr[f"{k}_seed_spread"])
    sc = res["scoring"]
    assert sc["max_abs_nll_diff_fp32"] < 1e-4  # memlens in float32 reproduces the baseline's own loss
    assert sc["padding_share"] < 0.1
    assert sc["ratio"] == pytest.approx(sc["memlens_tok_s"] / sc["baseline_tok_s"])
    assert res["study"]["runs"] == 1 and res["study"]["of"] == 15
    pc = res["precision_check"]
    assert (pc is None) == (sc["precision"] == "float32")  # (e) only where memlens computes in bf16
    for a, row in (pc or {"attacks": {}})["attacks"].items():
        assert row["within"] == (row["lo"] <= row[pc["precision"]] <= row["hi"]), a
    assert res["bf16_native"] == (sc["precision"] == "bfloat16")
    text = out.read_text()
    assert "(c)'s fit" in text and "| heldout |" in text
    assert "(a) scoring" in text and "(d) paper-table-3.1 quick" in text and f"{sc['ratio']:.1f}x" in text



def test_bench_rewrites_its_own_block_and_keeps_the_rest_of_the_page():
    from bench import BEGIN, END, place_block

    page = f"# Performance\n\n{BEGIN}\nold figures\n{END}\n\n## Memory\nkept by hand\n"
    new = place_block(page, ["new figures"])
    assert new == f"# Performance\n\n{BEGIN}\nnew figures\n{END}\n\n## Memory\nkept by hand\n"
    # a page without the markers keeps all it had, the figures below it
    assert place_block("# Notes\nmine\n", ["x"]) == f"# Notes\nmine\n\n{BEGIN}\nx\n{END}\n"


def test_trainer_baseline_interrupted_goes_on_from_its_checkpoint_to_the_same_adapter(tmp_path, monkeypatch):
    """benchmarks/fit.py's Trainer runs survive a kill: a rerun with the same checkpoint folder ends with the adapter,
    losses and batches of a training never interrupted."""
    import memlens.scoring as S
    from baseline import trainer_loop

    from memlens.config import LoraConfig, TrainConfig
    from memlens.finetune import apply_lora

    lm = build_tiny()
    seqs = lm.encode(TEXTS * 3)  # 12 texts: batches of 4, 3 per epoch, 10 steps over 4 epochs
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=1e-2, warmup_steps=2, seed=3, precision="float32",
                      batching="random")

    def trained(folder):
        model, _ = apply_lora(build_tiny(), LoraConfig(targets=["q", "v"], rank=2, dropout=0.1), seed=3)
        rows = trainer_loop(model, seqs, cfg, lm.pad_id, checkpoints=folder, save_steps=4)
        return rows, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    whole_rows, whole = trained(None)
    real, calls = S.pad_batch, []

    def dying(*a, **k):  # the kill: while the 7th step's batch is made, after the checkpoint of step 4
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "pad_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        trained(tmp_path / "ckpt")
    monkeypatch.setattr(S, "pad_batch", real)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["checkpoint-4"]
    (tmp_path / "ckpt" / "checkpoint-8").mkdir()  # the next save, cut short by the kill: passed over
    rows, resumed = trained(tmp_path / "ckpt")
    assert [r["step"] for r in rows] == list(range(5, 11))  # this try's steps only
    for r, w in zip(rows, whole_rows[4:]):
        assert (r["tokens"], r["sequences"]) == (w["tokens"], w["sequences"])  # the same batches
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-5)
    assert resumed.keys() == whole.keys() and len(whole) == 2 * 2 * lm.model.config.num_hidden_layers
    for k in whole:
        assert torch.allclose(resumed[k], whole[k], atol=1e-6), k
    assert all(v.abs().sum() > 0 for k, v in whole.items() if "lora_B" in k)  # trained: B starts at zero


def _tiny_trainer(cfg, folder=None, save_steps=50):
    from baseline import trainer_loop

    from memlens.config import LoraConfig
    from memlens.finetune import apply_lora

    lm = build_tiny()
    model, _ = apply_lora(lm, LoraConfig(targets=["q", "v"], rank=2), seed=cfg.seed)
    rows = trainer_loop(model, lm.encode(TEXTS * 3), cfg, lm.pad_id, checkpoints=folder, save_steps=save_steps)
    return rows, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_trainer_baseline_killed_after_its_last_step_gives_its_adapter_without_training_again(tmp_path):
    """The Trainer saves at the last step too: a rerun of a run killed after training (4 steps of 3-step epochs, so
    that the last epoch is cut) loads that adapter and trains nothing, instead of a step 5."""
    from memlens.config import TrainConfig

    cfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=1, seed=1, precision="float32",
                      batching="random")
    rows, first = _tiny_trainer(cfg, tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]
    again, second = _tiny_trainer(cfg, tmp_path)
    assert again == [] and [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]
    assert all(torch.equal(first[k], second[k]) for k in first) and any("lora_B" in k for k in first)


def test_trainer_baseline_rows_count_what_each_step_trained_on_with_grad_accum():
    """grad_accum 2 over 3 micro-batches an epoch: the Trainer's steps take 2 then 1 micro-batch; each row counts
    its own sequences and target tokens."""
    from memlens.config import TrainConfig

    cfg = TrainConfig(max_steps=4, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1, seed=1,
                      precision="float32", batching="random")
    rows, _ = _tiny_trainer(cfg)
    assert [r["sequences"] for r in rows] == [8, 4, 8, 4]
    targets = sum(len(s) - 1 for s in build_tiny().encode(TEXTS * 3))  # an epoch's
    assert rows[0]["tokens"] + rows[1]["tokens"] == targets == rows[2]["tokens"] + rows[3]["tokens"]
