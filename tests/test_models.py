import pytest
import torch

from memlens.config import LoraConfig
from memlens.errors import MemlensError
from memlens.finetune import apply_lora, expected_lora_params, lora_scalings, trainable_by_target
from memlens.models import build_tiny, load_model, resolve_targets
from memlens.scoring import score


def _lora_modules(model) -> set[str]:
    return {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
            for n, _ in model.named_modules() if n.endswith(".lora_A")}


@pytest.mark.parametrize("targets", [["q"], ["k"], ["v"], ["o"], ["q", "k"], ["q", "k", "v", "o"],
                                     ["gate", "up", "down"]])
@pytest.mark.parametrize("rank", [1, 4])
def test_target_map_adapts_exactly_the_named_modules(targets, rank):
    lm = build_tiny()
    suffix = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}
    expected_names = {f"model.layers.{i}.{'mlp' if t in ('gate', 'up', 'down') else 'self_attn'}.{suffix[t]}"
                      for t in targets for i in range(2)}
    # shapes of the tiny Llama: hidden 64, 4 heads of 16, 2 KV heads -> k/v project 64 -> 32; MLP 64 <-> 128
    shape = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128),
             "down": (128, 64)}
    model, tmap = apply_lora(lm, LoraConfig(targets=targets, rank=rank), seed=0)
    assert _lora_modules(model) == expected_names
    counts = trainable_by_target(model, tmap)
    assert counts == {t: 2 * rank * sum(shape[t]) for t in targets}
    assert counts == expected_lora_params(model.base_model.model, tmap, rank)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(counts.values())


def test_fused_qkv_model_refuses_a_single_matrix_and_adapts_qkv():
    lm = build_tiny("gpt2")
    with pytest.raises(MemlensError, match="gpt2 fuses Q, K and V .* use target 'qkv'"):
        resolve_targets(lm.model, ["v"])
    model, tmap = apply_lora(lm, LoraConfig(targets=["qkv", "o"], rank=2), seed=0)
    assert _lora_modules(model) == {f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")}
    assert trainable_by_target(model, tmap) == {"qkv": 2 * 2 * (64 + 192), "o": 2 * 2 * (64 + 64)}


def test_llama_model_has_no_fused_target():
    with pytest.raises(MemlensError, match="'qkv' has no matrix in llama"):
        resolve_targets(build_tiny().model, ["qkv"])


@pytest.mark.parametrize("rule,rank,expected", [("fixed", 1, 16.0), ("fixed", 8, 2.0), ("proportional", 8, 2.0),
                                                ("proportional", 1, 2.0), ("rslora", 4, 8.0), ("rslora", 16, 4.0)])
def test_alpha_rule_gives_the_expected_lora_scaling(rule, rank, expected):
    cfg = LoraConfig(targets=["q", "v"], rank=rank, alpha=16, alpha_rule=rule)
    model, _ = apply_lora(build_tiny(), cfg, seed=0)
    scalings = lora_scalings(model)
    assert len(scalings) == 1 and scalings.pop() == pytest.approx(expected)
    assert cfg.scaling == pytest.approx(expected)


def test_fresh_adapter_is_a_no_op_and_disabling_restores_the_base():
    lm = build_tiny()
    ids = torch.tensor([lm.encode(["A 30-year-old man developed rash after oral ibuprofen."])[0]])
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits.clone()
    model, _ = apply_lora(lm, LoraConfig(targets=["v", "o"], rank=4, dropout=0.0), seed=0)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
        changed = model(input_ids=ids).logits
        with model.disable_adapter():
            restored = model(input_ids=ids).logits
    assert (changed - base).abs().max() > 1e-3
    assert torch.allclose(restored, base, atol=1e-6)


def test_unknown_model_is_refused():
    with pytest.raises(MemlensError, match="unknown model 'no such model'"):
        load_model("no such model")
    with pytest.raises(MemlensError, match="not in the local cache"):
        load_model("memlens-test/does-not-exist")


def test_local_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(MemlensError, match="no \\*.safetensors file"):
        load_model(str(tmp_path))


def test_local_folder_roundtrip(tmp_path):
    lm = build_tiny()
    lm.model.save_pretrained(tmp_path, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.tensor(again.encode(["Warfarin and bleeding."]))
    assert again.bos_id == lm.bos_id
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_batched_nll_matches_one_sample_at_a_time():
    lm = build_tiny()
    texts = ["Short one.", "A 45-year-old woman developed acute hepatitis after amiodarone 200 mg daily.",
             "Carbamazepine-induced rash in a child.", "x"]
    seqs = lm.encode(texts)
    stats = score(lm.model, seqs, batch_size=3, pad_id=lm.tokenizer.pad_token_id)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s])
        with torch.no_grad():
            out = lm.model(input_ids=ids, labels=ids)  # HF mean loss over targets 1..L-1
        assert stats.n_tokens[i] == len(s) - 1
        assert stats.mean_nll[i] == pytest.approx(float(out.loss), abs=1e-5)


@pytest.mark.slow
def test_smollm2_alias_prepares_and_loads_offline():
    lm = load_model("smollm2-135m")
    assert lm.info["parameters"] == 134_515_008 and lm.info["model_type"] == "llama"
    assert lm.bos_id == 0
    seqs = lm.encode(["Phenobarbital hepatotoxicity in an 8-month-old infant."])
    assert seqs[0][0] == 0 and len(seqs[0]) == 18
    ppl = float(score(lm.model, seqs).perplexity[0])
    assert 2 < ppl < 500
    model, tmap = apply_lora(lm, LoraConfig(targets=["q", "k", "v", "o"], rank=8), seed=0)
    # MODELS.md: SmolLM2 at r=8: q 276,480, k 184,320, v 184,320, o 276,480 trainable parameters
    assert trainable_by_target(model, tmap) == {"q": 276_480, "k": 184_320, "v": 184_320, "o": 276_480}


@pytest.mark.slow
def test_gemma3_alias_prepares_fine_tunes_and_audits_offline(tmp_path):
    """Gemma-3-270m from its PyPI packages (in this test's empty cache: assembled, checked, converted), then a LoRA
    run and its audit on a few sentences; its 262,144-token output head runs only on target positions."""
    import json

    from memlens.audit import run_config
    from memlens.config import load_config
    from memlens.scoring import head_plan

    lm = load_model("gemma3-270m")
    assert lm.info["model_type"] == "gemma3_text" and lm.info["parameters"] == 268_098_176
    assert lm.model.config.vocab_size == 262_144 and head_plan("cpu", 262_144) == (256, 32)
    seqs = lm.encode(["Phenobarbital hepatotoxicity in an 8-month-old infant."])
    assert seqs[0][0] == lm.bos_id == 2 and seqs[0][1] != 2  # one BOS: memlens adds none of its own
    assert 2 < float(score(lm.model, seqs).perplexity[0]) < 200
    texts = ["A 45-year-old woman developed acute hepatitis after amiodarone 200 mg daily.",
             "Carbamazepine-induced rash in a child.", "Serotonin syndrome after linezolid and sertraline.",
             "Lithium toxicity presenting as ataxia.", "Vancomycin-associated thrombocytopenia in an adult.",
             "Cisplatin ototoxicity in two children.", "Isoniazid hepatitis during latent TB therapy.",
             "Propofol infusion syndrome after prolonged sedation."]
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "text": t, "split": "train" if i < 4 else "test"}) + "\n"
                            for i, t in enumerate(texts)))
    cfg = load_config(None, ["model=gemma3-270m", f"data.source=jsonl:{data}", "data.members.n=4",
                             "data.nonmembers.n=4", "lora.targets=[v]", "lora.rank=2", "train.max_steps=6",
                             "train.batch_size=4", "train.lr=5.0e-3", "train.warmup_steps=0",
                             "audit.extraction.n=2", "audit.blind=false", f"output_dir={tmp_path / 'runs'}"])
    res = run_config(cfg, progress=False)
    s = res.summary
    assert s["model"]["model_type"] == "gemma3_text" and s["adapter_changed"] and s["steps"] == 6
    assert s["n_members"] == 4 and s["n_nonmembers"] == 4
    assert s["last_loss"] < s["first_loss"]  # six steps on four sentences: it learns them
    for name, a in s["attacks"].items():
        assert 0 <= a["auc"] <= 1, name
    assert (res.run_dir / "adapter" / "adapter_model.safetensors").is_file()
