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


def test_the_reports_anatomy_grid_puts_each_run_and_matrix_in_its_own_column():
    """Across runs: a column per run (and per matrix where a run adapts several), each cell the run's own metric for
    that layer and matrix; runs of another model (other layers) are left out."""
    import numpy as np

    from memlens.report import figures as F
    from memlens.report import leakage as LK
    from memlens.report.data import RunView

    def run(name, targets, layers, value, repeats=1):
        metrics = [{"name": "anatomy:relative", "subject": f"{t}.{i}", "value": value(t, i),
                    "details": {"layer": i, "matrix": t}} for i in layers for t in targets]
        cfg = {"lora": {"targets": targets, "rank": 1}, "data": {"canary": {"repeats": repeats}}}
        return RunView(name, name, "s", cfg, {"anatomy": {t: {"fro": 1.0} for t in targets}}, metrics)

    runs = [run("a", ["q"], range(3), lambda t, i: 0.1 * i), run("b", ["q", "v"], range(3), lambda t, i: i + (t == "v")),
            run("c", ["v"], range(3), lambda t, i: 7.0, repeats=8), run("other", ["q"], range(5), lambda t, i: 9.0)]
    layers, labels, grid = LK.anatomy_columns(runs)
    assert layers == [0, 1, 2] and labels == ["Q r1", "Q+V r1: Q", "Q+V r1: V", "V r1 x8"]
    assert np.allclose(grid, [[0.0, 0, 1, 7], [0.1, 1, 2, 7], [0.2, 2, 3, 7]])
    assert F.anatomy_heatmap("x", layers, labels, grid, "relative") is not None
    assert LK.anatomy_columns([RunView("n", "n", "s", {}, {}, [])]) is None
