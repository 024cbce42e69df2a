import numpy as np
import pytest

from memlens.anatomy import adapter_anatomy, module_stats, summarize, update_singular_values


def test_singular_values_from_the_small_factors_equal_a_dense_svd():
    rng = np.random.default_rng(0)
    for r in (1, 3, 8):
        a, b = rng.normal(size=(r, 40)), rng.normal(size=(30, r))
        dense = np.linalg.svd(2.5 * b @ a, compute_uv=False)[:r]
        assert np.allclose(update_singular_values(a, b, 2.5), dense)
    s = module_stats(np.ones((1, 4)), np.ones((3, 1)), 1.0, np.eye(3, 4))
    # dW = all-ones 3 x 4: rank 1, Frobenius = spectral = sqrt(12); ||W||_F = sqrt(3)
    assert s["fro"] == pytest.approx(np.sqrt(12)) and s["spectral"] == pytest.approx(np.sqrt(12))
    assert s["stable_rank"] == pytest.approx(1.0) and s["relative"] == pytest.approx(2.0)


def test_anatomy_equals_a_direct_computation_from_the_adapters_safetensors(tmp_path):
    import torch
    from safetensors.numpy import load_file

    from memlens.config import LoraConfig
    from memlens.finetune import apply_lora
    from memlens.models import build_tiny

    lm = build_tiny()
    base = {n: p.detach().numpy().copy() for n, p in lm.model.named_parameters()}
    model, target_map = apply_lora(lm, LoraConfig(targets=["q", "v"], rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # set B and A (B is zero after initialisation)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    rows = adapter_anatomy(model, target_map)
    model.save_pretrained(tmp_path, safe_serialization=True)
    w = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(rows) == 2 * lm.model.config.num_hidden_layers
    for r in rows:
        key = f"base_model.model.{r['module']}"
        a, b = w[f"{key}.lora_A.weight"], w[f"{key}.lora_B.weight"]
        dw = (8 / 4) * b.astype(np.float64) @ a.astype(np.float64)
        sv = np.linalg.svd(dw, compute_uv=False)
        frozen = base[f"{r['module']}.weight"]
        assert r["fro"] == pytest.approx(np.linalg.norm(dw), rel=1e-6)
        assert r["spectral"] == pytest.approx(sv[0], rel=1e-6)
        assert r["stable_rank"] == pytest.approx(np.sum(sv**2) / sv[0] ** 2, rel=1e-6)
        assert r["relative"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(frozen), rel=1e-6)
        assert r["matrix"] in ("q", "v") and r["layer"] is not None and r["rank"] == 4 and r["scaling"] == 2.0
    by = summarize(rows)
    assert set(by) == {"q", "v"}
    q = [r for r in rows if r["matrix"] == "q"]
    assert by["q"]["fro"] == pytest.approx(np.sqrt(sum(r["fro"] ** 2 for r in q)))
