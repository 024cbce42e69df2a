"""Reusing a trained adapter: a run whose training is an earlier run's audits that run's adapter instead of training
again (``reuse_training: true``; off by default, and not part of the run id).

Two runs train the same adapter when everything but the audit is equal: model, data, adapter and training settings,
and the device and precision these resolve to (:meth:`memlens.config.RunConfig.training_hash`). Training is
deterministic for a config and seed, so the audit of the reused adapter gives the numbers training again would: the
reference attacks, say, can be added to a finished full-size study without its hours of training.

The earlier run is looked for among the run folders of ``output_dir``, and one is taken only when it is memlens's
own and complete, and when what it was trained on is what this run would train on:

- its summary.json names the run id of its config.yaml, recomputed here (so its ``auto`` settings resolved as here);
- the training hashes are equal, and so are the data manifests (the same corpus files and draw);
- its adapter's ``memlens_base.json`` holds the fingerprint of this base model's weights;
- its training had no DP, early stopping or trajectory (their facts come from the training itself).

The run's summary names the run it reused (``reused_training``) and keeps that training's facts (steps, losses,
tokens per second); its clocks hold the time the adapter took to load, not the earlier training's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


def _candidate(folder: Path, cfg: Any, manifest_hash: str) -> dict[str, Any] | None:
    """The summary of the run folder ``folder`` when it trained what ``cfg`` would train, else None."""
    from memlens.config import RunConfig

    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        summary = json.loads((folder / "summary.json").read_text())
        other = RunConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    except (OSError, ValueError, TypeError):  # not a run folder, or one of an older memlens
        return None
    if not isinstance(summary, dict) or summary.get("config_hash") != other.config_hash():
        return None
    if other.training_hash() != cfg.training_hash() or summary.get("manifest_hash") != manifest_hash:
        return None
    if any(k in summary for k in ("dp", "early_stopping", "trajectory")):
        return None
    needed = ("train_log.jsonl", "adapter/adapter_model.safetensors", "adapter/memlens_base.json")
    if not all((folder / f).is_file() for f in needed):
        return None
    return summary


def find_trained(cfg: Any, prep: Any) -> Any | None:
    """The adapter of an earlier run in ``cfg.output_dir`` with this run's training, loaded on the base model as a
    :class:`memlens.finetune.Trained`; None when there is none (the caller then trains)."""
    from peft import PeftModel

    from memlens.finetune import Trained, lora_scalings, trainable_by_target
    from memlens.models import base_record, resolve_targets

    out = Path(cfg.output_dir)
    if not out.is_dir():
        return None
    target_map = resolve_targets(prep.lm.model, list(cfg.lora.targets))
    base = base_record(prep.lm, target_map)
    for folder in sorted(out.iterdir()):
        summary = _candidate(folder, cfg, prep.split.manifest["hash"])
        if summary is None:
            continue
        recorded = json.loads((folder / "adapter" / "memlens_base.json").read_text())
        if recorded.get("fingerprint") != base["fingerprint"]:
            continue
        t = time.perf_counter()
        model = PeftModel.from_pretrained(prep.lm.model, str(folder / "adapter"), is_trainable=True)
        model.eval()
        rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line]
        seconds = float(summary["timings_s"]["train_s"])
        changed = any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
        log.info("training: reusing the adapter of %s (same training, run %s)", folder.name,
                 summary["config_hash"][:12])
        return Trained(model, rows, trainable_by_target(model, target_map), sorted(lora_scalings(model)),
                       dict(target_map), changed, seconds, base,
                       reused_from={"run": folder.name, "run_id": summary["config_hash"],
                                    "load_s": round(time.perf_counter() - t, 3)})
    log.info("training: no run in %s trained this adapter yet; training it", out)
    return None
