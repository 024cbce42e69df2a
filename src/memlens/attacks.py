"""Membership attacks: pure functions of per-sample statistics. A higher score means "more likely a member".

| attack        | score                                    | source                                            |
|---------------|------------------------------------------|---------------------------------------------------|
| loss          | -NLL_ft                                  | Yeom et al. 2018                                  |
| ref_ratio     | NLL_base / NLL_ft                        | Savine et al., the authors' code                   |
| ref_diff      | NLL_base - NLL_ft (log likelihood ratio) | Savine et al., the paper's formula; Carlini 2022   |
| zlib          | -NLL_ft / zlib bytes of the text         | Carlini et al. 2021                                |
| min_k         | mean of the lowest k% token log-probs    | Shi et al. 2024                                    |
| min_k_pp      | the same over standardised log-probs     | Zhang et al. 2024                                  |
| min_k_ref     | min_k(ft) - min_k(base)                  | calibrated by the base model                       |
| min_k_pp_ref  | min_k_pp(ft) - min_k_pp(base)            | calibrated by the base model                       |

NLL is the mean token NLL of the sample (BOS excluded). The base (pre-trained) model is the reference.
"""

from __future__ import annotations

import numpy as np

from memlens.scoring import SampleStats

ATTACKS = ("loss", "ref_ratio", "ref_diff", "zlib", "min_k", "min_k_pp", "min_k_ref", "min_k_pp_ref")


def attack_scores(ft: SampleStats, base: SampleStats, zlib_bytes: np.ndarray, k: float = 0.2,
                  attacks: tuple[str, ...] = ATTACKS) -> dict[str, np.ndarray]:
    """Scores of each attack for every sample; ``k`` is the Min-K% fraction."""
    out: dict[str, np.ndarray] = {}
    for name in attacks:
        if name == "loss":
            out[name] = -ft.mean_nll
        elif name == "ref_ratio":
            out[name] = base.mean_nll / np.maximum(ft.mean_nll, 1e-12)
        elif name == "ref_diff":
            out[name] = base.mean_nll - ft.mean_nll
        elif name == "zlib":
            out[name] = -ft.mean_nll / np.asarray(zlib_bytes, dtype=np.float64)
        elif name == "min_k":
            out[name] = ft.min_k[k]
        elif name == "min_k_pp":
            out[name] = ft.min_k_pp[k]
        elif name == "min_k_ref":
            out[name] = ft.min_k[k] - base.min_k[k]
        elif name == "min_k_pp_ref":
            out[name] = ft.min_k_pp[k] - base.min_k_pp[k]
        else:
            raise ValueError(f"unknown attack {name!r}: expected one of {', '.join(ATTACKS)}")
    return out
