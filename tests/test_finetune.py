import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from memlens.config import RunConfig, load_config
from memlens.errors import MemlensError
from memlens.finetune import epoch_batches, finetune, lr_lambda, plan_steps

TINY = ["model=tiny", "data.source=synthetic", "data.synthetic_size=300", "data.members.n=24",
        "data.nonmembers.n=24", "train.epochs=2", "train.batch_size=8", "train.warmup_steps=2", "lora.rank=4",
        "lora.targets=[q, v]"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path}", *extra])


def _adapter(run_dir: Path):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_same_seed_gives_bit_identical_adapters_and_another_seed_does_not(tmp_path):
    a = finetune(_cfg(tmp_path, "name=a"), progress=False)
    b = finetune(_cfg(tmp_path, "name=b"), progress=False)
    c = finetune(_cfg(tmp_path, "name=c", "train.seed=1"), progress=False)
    wa, wb, wc = _adapter(a.run_dir), _adapter(b.run_dir), _adapter(c.run_dir)
    assert wa.keys() == wb.keys() and len(wa) == 8  # A and B for q and v in 2 layers
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any(not (wa[k] == wc[k]).all() for k in wa)
    losses = [[json.loads(r)["loss"] for r in (d / "train_log.jsonl").read_text().splitlines()] for d in (a.run_dir, b.run_dir)]
    assert losses[0] == losses[1]


def test_run_folder_contents_and_provenance(tmp_path):
    res = finetune(_cfg(tmp_path), progress=False)
    d = res.run_dir
    assert sorted(p.name for p in d.iterdir()) == ["adapter", "config.yaml", "manifest.json", "summary.json",
                                                   "train_log.jsonl"]
    s = json.loads((d / "summary.json").read_text())
    cfg = load_config(d / "config.yaml")
    assert s["config_hash"] == cfg.config_hash() == _cfg(tmp_path).config_hash()
    manifest = json.loads((d / "manifest.json").read_text())
    assert s["manifest_hash"] == manifest["hash"]
    assert s["trainable_params"] == {"q": 2 * 4 * (64 + 64), "v": 2 * 4 * (64 + 32)}
    assert s["lora_scaling"] == [4.0] and s["adapter_changed"] is True
    assert s["versions"]["torch"] and s["versions"]["transformers"] and s["seed"] == 0
    # 24 members in micro-batches of 8 -> 3 steps per epoch, 2 epochs
    assert s["steps"] == 6 and len((d / "train_log.jsonl").read_text().splitlines()) == 6
    assert s["counts"] == {"train": 24, "members": 24, "nonmembers": 24, "canaries": 0, "displaced": 0,
                           "overlaps": 0, "formatted_canaries": 0}
    texts = [r for r in (d / "manifest.json").read_text().split('"') if "year-old" in r]
    assert texts == []  # ids and hashes only, never the raw text
    with pytest.raises(MemlensError, match="run.s folder exists"):
        finetune(_cfg(tmp_path), progress=False)


def test_member_loss_falls(tmp_path):
    # The random tiny model's output layer is small (init std 0.02), so LoRA moves the loss slowly: assert a clear
    # fall, not memorization (the full fine-tuning test below shows that).
    cfg = _cfg(tmp_path, "data.members.n=8", "train.epochs=100", "train.lr=1e-2", "train.warmup_steps=5",
               "lora.targets=[q, k, v, o, gate, up, down]", "lora.rank=16", "lora.alpha_rule=proportional",
               "lora.dropout=0")
    s = finetune(cfg, progress=False).summary
    assert s["member_nll_after"] < s["member_nll_before"] - 0.5
    assert s["last_loss"] < s["first_loss"] - 0.5


def test_full_finetuning_trains_every_weight_and_memorizes(tmp_path):
    cfg = _cfg(tmp_path, "train.method=full", "data.members.n=8", "train.epochs=100", "train.lr=1e-2",
               "train.warmup_steps=5")
    res = finetune(cfg, progress=False)
    s = res.summary
    assert s["trainable_params"] == {"all": s["model"]["parameters"]}
    assert s["member_nll_before"] > 6 and s["member_nll_after"] < 0.2
    assert (res.run_dir / "model" / "model.safetensors").is_file()


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import memlens.finetune as ft

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ft.json, "dumps", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        finetune(_cfg(tmp_path), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_schedule_matches_transformers_linear_warmup():
    from transformers import get_linear_schedule_with_warmup
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(opt, 10, 50)
    ours = lr_lambda(10, 50, "linear")
    for step in range(50):
        assert ours(step) == pytest.approx(ref.lr_lambdas[0](step))


def test_plan_steps_epochs_and_max_steps():
    cfg = RunConfig().train
    assert plan_steps(2898, cfg.model_copy(update={"batch_size": 16, "grad_accum": 4, "epochs": 3})) == (182, 138)
    assert plan_steps(100, cfg.model_copy(update={"batch_size": 16, "max_steps": 5})) == (7, 5)


# --------------------------------------------------------------------------------------------------------------- CLI


def _memlens(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "memlens", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_cli_finetune_end_to_end(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\ndata: {source: synthetic, synthetic_size: 200}\n")
    out = _memlens("finetune", str(cfg), "data.members.n=16", "data.nonmembers.n=16", "train.epochs=1",
                   "--quiet", f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("content,message", [
    ('{"id": "a", "text": "one"}\n{"id": "b", "text": ""}\n', "data.jsonl:2: field 'text' is empty"),
    ('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n', "data.jsonl:2: duplicate id 'a'"),
    ('{"id": "a", "text": "one"}\n{"id": "b", "text": "two"\n', "data.jsonl:2: malformed JSON"),
])
def test_cli_bad_input_exits_non_zero_with_one_message_and_writes_nothing(tmp_path, content, message):
    (tmp_path / "data.jsonl").write_text(content)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny\ndata: {{source: 'jsonl:{tmp_path / 'data.jsonl'}', members: {{n: 1}}, "
                   f"nonmembers: {{n: 1}}}}\noutput_dir: {tmp_path / 'runs'}\n")
    out = _memlens("finetune", str(cfg), "--quiet", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("error:") == 1
    assert not (tmp_path / "runs").exists()


def test_cli_unknown_key_and_unknown_model(tmp_path):
    out = _memlens("finetune", "missing.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "missing.yaml: config file not found" in out.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\nlora: {rnak: 2}\n")
    out = _memlens("finetune", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "unknown key 'lora.rnak' (did you mean 'lora.rank'?)" in out.stderr
    cfg.write_text("model: tiny\n")
    out = _memlens("finetune", str(cfg), "model=llama-9000", f"output_dir={tmp_path}/r",
                   "data.synthetic_size=100", cwd=tmp_path)
    assert out.returncode == 2 and "unknown model 'llama-9000'" in out.stderr
    assert not (tmp_path / "r").exists()


def test_cli_data_inspect_reports_phee_counts_and_overlap(tmp_path, phee_dir):
    out = _memlens("data", "inspect", "phee", "--path", str(phee_dir), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for line in ("train", "2898", "dev", "961", "test", "968", "train x test"):
        assert line in out.stdout
    out = _memlens("data", "inspect", "jsonl:nope.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and "nope.jsonl: file not found" in out.stderr


def test_cli_models_list(tmp_path):
    out = _memlens("models", "list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m" in out.stdout and "gemma3-270m" in out.stdout and "tiny" in out.stdout


@pytest.mark.parametrize("batching", ["random", "grouped"])
def test_epoch_batches_cover_every_sequence_once(batching):
    import torch

    lengths = [5 + (i * 37) % 90 for i in range(300)]
    batches = epoch_batches(lengths, 16, batching, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(1 <= len(b) <= 16 for b in batches)
    again = epoch_batches(lengths, 16, batching, torch.Generator().manual_seed(0))
    assert again == batches  # same seed, same batches


def test_grouped_batches_pad_less_and_still_vary_between_epochs():
    import torch

    lengths = [5 + (i * 37) % 90 for i in range(320)]

    def padding(batches):
        return 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    gen = torch.Generator().manual_seed(0)
    grouped = [epoch_batches(lengths, 16, "grouped", gen) for _ in range(2)]
    rand = epoch_batches(lengths, 16, "random", torch.Generator().manual_seed(0))
    assert padding(grouped[0]) < 0.15 < 0.3 < padding(rand)
    assert {tuple(sorted(b)) for b in grouped[0]} != {tuple(sorted(b)) for b in grouped[1]}


def test_precision_auto_follows_the_hardware_and_training_autocasts(monkeypatch):
    import torch

    from memlens import models as M
    from memlens.finetune import autocast

    monkeypatch.setattr(M, "fast_bf16", lambda device: True)
    assert M.resolve_precision("auto", "cpu") == "bfloat16"
    assert M.resolve_precision("float32", "cpu") == "float32"
    lm = M.build_tiny()
    with autocast(lm.model, "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(lm.model, "float32"):
        assert not torch.is_autocast_enabled("cpu")
    copy = M.at_precision(lm.model, "bfloat16")
    assert copy is not lm.model and M.weights_dtype(copy) == torch.bfloat16
    assert M.weights_dtype(lm.model) == torch.float32  # the original keeps its float32 weights
    assert M.at_precision(lm.model, "float32") is lm.model and M.at_precision(copy, "float32") is copy
    monkeypatch.setattr(M, "fast_bf16", lambda device: False)
    assert M.resolve_precision("auto", "cpu") == "float32"


def test_pack_batch_targets_stay_within_each_sequence():
    from memlens.scoring import pack_batch

    batch = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    ids, pos, labels = pack_batch(batch)  # 9 tokens: one row, longest first
    assert ids.tolist() == [[1, 8, 9, 10, 1, 5, 6, 1, 7]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert labels.tolist() == [8, 9, 10, -100, 5, 6, -100, 7, -100]
    # rows of about 4 tokens: each sequence to the shortest row, longest first; padding ends the short rows as a
    # sequence of its own (positions restart) that is never a target
    ids, pos, labels = pack_batch(batch, pad_id=0, row_length=4)
    assert ids.tolist() == [[1, 8, 9, 10], [1, 5, 6, 0], [1, 7, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert labels.tolist() == [8, 9, 10, -100, 5, 6, -100, -100, 7, -100, -100, -100]
    # every target of the padded batch, once
    assert sorted(t for t in labels.tolist() if t != -100) == sorted(t for s in batch for t in s[1:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_batches_train_as_padded_ones_do(arch):
    """Same batches, no dropout, float32: packing gives the padded loop's losses and adapter up to rounding."""
    import torch

    from memlens.config import LoraConfig, TrainConfig
    from memlens.data import synthetic
    from memlens.finetune import apply_lora, train_loop
    from memlens.models import build_tiny

    results = []
    for packing in (True, False):
        lm = build_tiny(arch=arch)
        for m in lm.model.modules():  # GPT-2's own dropout (0.1) would draw differently in the two layouts
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        seqs = lm.encode([r.text for r in synthetic.generate(40, seed=3)])
        model, _ = apply_lora(lm, LoraConfig(targets=["qkv" if arch == "gpt2" else "q", "o"], rank=4, dropout=0.0),
                              seed=0)
        cfg = TrainConfig(max_steps=4, batch_size=8, lr=1e-2, warmup_steps=0, precision="float32", batching="random",
                          packing=packing)
        rows = train_loop(model, seqs, cfg, lm.pad_id, progress=False)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        results.append(([r["loss"] for r in rows], weights, [r["tokens"] for r in rows]))
    (lp, wp, tp), (lq, wq, tq) = results
    assert tp == tq
    assert lp == pytest.approx(lq, rel=1e-5)
    assert lp[-1] < lp[0]  # it trains
    assert all(torch.allclose(wp[n], wq[n], atol=1e-5) for n in wp)


def test_packing_falls_back_to_padding_where_attention_crosses_sequences(monkeypatch, caplog):
    import torch

    import memlens.scoring as S
    from memlens.data import synthetic
    from memlens.finetune import packing_works
    from memlens.models import build_tiny

    lm = build_tiny()
    seqs = lm.encode([r.text for r in synthetic.generate(20, seed=3)])
    assert packing_works(lm.model, seqs, lm.pad_id)
    real = S.pack_batch

    def one_long_sequence(batch, *args, **kwargs):  # positions that never restart: attention crosses the row
        ids, _, labels = real(batch, *args, **kwargs)
        return ids, torch.arange(ids.shape[1]).expand_as(ids), labels

    monkeypatch.setattr(S, "pack_batch", one_long_sequence)
    assert not packing_works(lm.model, seqs, lm.pad_id)
    assert "padded instead" in caplog.text


def test_frozen_linears_in_bf16_train_bit_for_bit_as_autocast_alone_and_are_restored(monkeypatch):
    import contextlib

    import torch

    import memlens.finetune as F
    from memlens.config import LoraConfig, TrainConfig
    from memlens.data import synthetic
    from memlens.models import build_tiny

    out = []
    for held in (True, False):
        if not held:
            monkeypatch.setattr(F, "frozen_linears_at",
                                lambda m, p: contextlib.nullcontext(contextlib.nullcontext))
        lm = build_tiny()
        before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        seqs = lm.encode([r.text for r in synthetic.generate(64, seed=3)])
        model, _ = F.apply_lora(lm, LoraConfig(targets=["q", "v", "o"], rank=4), seed=0)
        seen = []
        real = model.forward

        def spy(*a, **k):  # the dtype of a frozen projection while training
            seen.append(model.get_submodule("base_model.model.model.layers.0.self_attn.k_proj").weight.dtype)
            return real(*a, **k)

        monkeypatch.setattr(model, "forward", spy)
        rows = F.train_loop(model, seqs, TrainConfig(max_steps=6, batch_size=8, lr=1e-2, warmup_steps=0,
                                                     precision="bfloat16"), lm.pad_id, progress=False)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in
                model.named_parameters() if "lora_" not in n}
        assert all(torch.equal(base[n], before[n]) for n in before)  # the float32 base, untouched
        out.append(([r["loss"] for r in rows], weights, set(seen[2:])))  # after packing_works's two checks
    (l1, w1, d1), (l2, w2, d2) = out
    assert d1 == {torch.bfloat16} and d2 == {torch.float32}
    assert l1 == l2 and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_each_step_is_timed_when_it_ends_on_a_cpu(monkeypatch):
    """On a CPU a step's elapsed time is stamped when that step ends (the GPU's one-step-late read is GPU-only)."""
    import time as _time

    from memlens.config import LoraConfig, TrainConfig
    from memlens.data import synthetic
    from memlens.finetune import apply_lora, train_loop
    from memlens.models import build_tiny

    lm = build_tiny()
    seqs = lm.encode([r.text for r in synthetic.generate(32, seed=3)])
    model, _ = apply_lora(lm, LoraConfig(targets=["q"], rank=2), seed=0)
    real = model.forward

    def slow(*a, **k):
        _time.sleep(0.2)
        return real(*a, **k)

    monkeypatch.setattr(model, "forward", slow)
    rows = train_loop(model, seqs, TrainConfig(max_steps=4, batch_size=8, grad_accum=2, warmup_steps=0,
                                               packing=False), lm.pad_id, progress=False)
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    # two forwards of 0.2 s in every step; a stamp one step late would give the last two rows the same time
    assert len(rows) == 4 and all(g >= 0.35 for g in gaps), gaps


def test_processor_record_names_the_generation_and_instruction_sets(monkeypatch):
    from pathlib import Path

    from memlens import provenance

    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma sse4_2\n\nprocessor\t: 1\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: info if str(self) == "/proc/cpuinfo"
                        else real(self, *a, **k))
    rec = provenance.processor()
    assert (rec["model"], rec["family_model"], rec["isa"]) == ("AMD EPYC", "23/49", ["avx2", "fma"])
    info = info.replace("flags\t\t: fpu avx avx2 fma", "flags\t\t: avx2 fma avx512f avx512_bf16 amx_tile amx_bf16")
    assert provenance.processor()["isa"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
