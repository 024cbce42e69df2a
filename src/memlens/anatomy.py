"""The anatomy of an adapter: where LoRA put its weight.

For every adapted module (a layer's Q, K, V, O ...), the update the adapter adds to the frozen weight W is
dW = s * B @ A (B: out x r, A: r x in, s the LoRA scaling). Per module:

* ``fro``: its Frobenius norm ||dW||_F;
* ``spectral``: its largest singular value ||dW||_2;
* ``stable_rank``: ||dW||_F^2 / ||dW||_2^2 (between 1 and r: how many directions carry the update; 0 for a zero
  update);
* ``relative``: ||dW||_F / ||W||_F, its size against the frozen weight.

dW is never formed: with thin QR factorisations B = Q_B R_B and A^T = Q_A R_A, dW = s Q_B (R_B R_A^T) Q_A^T, so its
singular values are those of the r x r matrix s R_B R_A^T (exact, in float64). Computed for every LoRA run of
``memlens run`` from the trained peft model (not by ``memlens audit``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_LAYER = re.compile(r"\.(\d+)\.")


def update_singular_values(a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """Singular values of ``scaling * b @ a`` (b: out x r, a: r x in), largest first, from r x r factors."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _, rb = np.linalg.qr(b)
    _, ra = np.linalg.qr(a.T)
    return np.linalg.svd(scaling * rb @ ra.T, compute_uv=False)


def module_stats(a: np.ndarray, b: np.ndarray, scaling: float, frozen: np.ndarray | None = None) -> dict[str, float]:
    sv = update_singular_values(a, b, scaling)
    fro = float(np.sqrt(np.sum(sv**2)))
    spectral = float(sv[0]) if sv.size else 0.0
    out = {"fro": fro, "spectral": spectral, "stable_rank": fro**2 / spectral**2 if spectral > 0 else 0.0}
    if frozen is not None:
        w = float(np.linalg.norm(np.asarray(frozen, dtype=np.float64)))
        out["relative"] = fro / w if w > 0 else float("nan")
    return out


def matrix_of(module: str, target_map: dict[str, list[str]]) -> str:
    """The logical matrix (q, k, v, o ...) a module name belongs to."""
    for t, names in target_map.items():
        if module in names:
            return t
    return module.rsplit(".", 1)[-1]


def layer_of(module: str) -> int | None:
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def adapter_anatomy(model: Any, target_map: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per adapted module of a peft LoRA model: module, layer, matrix, rank, scaling and the statistics
    of :func:`module_stats` (the frozen weight from the module's base layer)."""
    rows = []
    for name, mod in model.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod, "base_layer")):
            continue
        for adapter in mod.lora_A:
            a = mod.lora_A[adapter].weight.detach().float().cpu().numpy()
            b = mod.lora_B[adapter].weight.detach().float().cpu().numpy()
            s = float(mod.scaling[adapter])
            w = mod.base_layer.weight.detach().float().cpu().numpy()
            if getattr(mod, "fan_in_fan_out", False):  # GPT-2 Conv1D stores (in, out)
                w = w.T
            short = name.removeprefix("base_model.model.")
            rows.append({"module": short, "layer": layer_of(short), "matrix": matrix_of(short, target_map),
                         "rank": int(a.shape[0]), "scaling": s, **module_stats(a, b, s, w)})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per matrix: the total Frobenius norm over layers (sqrt of the sum of squares), the largest spectral norm,
    and the mean relative size and stable rank."""
    out: dict[str, dict[str, float]] = {}
    for m in dict.fromkeys(r["matrix"] for r in rows):
        rs = [r for r in rows if r["matrix"] == m]
        out[m] = {"fro": float(np.sqrt(sum(r["fro"] ** 2 for r in rs))),
                  "spectral_max": max(r["spectral"] for r in rs),
                  "relative_mean": float(np.mean([r.get("relative", np.nan) for r in rs])),
                  "stable_rank_mean": float(np.mean([r["stable_rank"] for r in rs])), "modules": len(rs)}
    return out
