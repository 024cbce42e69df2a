"""Reusing a trained adapter: a run whose training is an earlier run's audits that run's adapter instead of training
again (``reuse_training: true``; off by default, and not part of the run id).

Two runs train the same adapter when everything but the audit is equal: model, data, adapter and training settings,
and the device and precision these resolve to (:meth:`memlens.config.RunConfig.training_hash`). On a CPU, training
is deterministic for a config and seed with the same library versions on the same kind of processor, so the audit of
the reused adapter gives the numbers training again would: the reference attacks, say, can be added to a finished
full-size study without its hours of training.

The earlier run is looked for among the run folders of ``output_dir``; one is taken only when it is memlens's own,
complete, trained by itself (not reused), and trained on what this run would train on:

- its summary.json names the run id of its config.yaml, recomputed here (so its ``auto`` settings resolved as here);
- the training hashes are equal, and so are the data manifests (the same corpus files and draw);
- its summary describes this base model (source, identity, size) and its adapter's ``memlens_base.json`` this base's
  targeted modules and weight fingerprint; its tensors adapt this run's modules at its rank, with its alpha;
- it was trained with the same memlens, torch, transformers and peft versions on the same kind of processor;
- its training had no DP, early stopping or trajectory (their facts come from the training itself).

Folders that fail a check, or cannot be read, are passed over (a folder being written, a folder of another memlens).
The run's summary names the run it reused (``reused_training``, with that training's seconds and commit) and keeps
that training's facts (steps, losses, tokens per second); its clocks hold the time the adapter took to load.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from memlens.errors import MemlensError

log = logging.getLogger(__name__)

SAME_VERSIONS = ("memlens", "torch", "transformers", "peft")
SAME_PROCESSOR = ("model", "family_model", "isa")


def _same_machine_kind(versions: dict[str, Any], now: dict[str, Any]) -> bool:
    """``versions`` (a run's) names the same library versions and processor kind as ``now`` (this process's)."""
    if any(versions.get(k) != now.get(k) for k in SAME_VERSIONS):
        return False
    cpu, cpu_now = versions.get("processor") or {}, now.get("processor") or {}
    return all(cpu.get(k) == cpu_now.get(k) for k in SAME_PROCESSOR)


@dataclass(frozen=True)
class _Wanted:
    """What a source folder must match: this run's, computed once for every folder looked at."""

    cfg: Any
    training_hash: str
    manifest_hash: str
    model: dict[str, Any]
    versions: dict[str, Any]
    base: dict[str, Any]  # memlens_base.json of this base and these targets
    names: set[str]  # the modules this run adapts


def _check(folder: Path, want: _Wanted) -> dict[str, Any] | None:
    """The summary of the run folder ``folder`` when it trained what this run would train, else None (may raise on
    unreadable files: the caller passes over the folder)."""
    from memlens.config import RunConfig
    from memlens.models import adapter_shapes

    if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    other = RunConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    if summary.get("config_hash") != other.config_hash() or "reused_training" in summary:
        return None
    if other.training_hash() != want.training_hash or summary.get("manifest_hash") != want.manifest_hash:
        return None
    if any(k in summary for k in ("dp", "early_stopping", "trajectory")):
        return None
    if summary.get("model") != want.model or not _same_machine_kind(summary.get("versions") or {}, want.versions):
        return None
    adapter = folder / "adapter"
    files = [adapter, *(adapter / f for f in ("adapter_model.safetensors", "adapter_config.json",
                                               "memlens_base.json")), folder / "train_log.jsonl"]
    if any(f.is_symlink() for f in files) or not all(f.is_file() for f in files[1:]):
        return None
    if json.loads((adapter / "memlens_base.json").read_text()) != want.base:
        return None
    lora = want.cfg.lora
    ac = json.loads((adapter / "adapter_config.json").read_text())
    if (float(ac.get("lora_alpha")), bool(ac.get("use_rslora"))) != (float(lora.effective_alpha),
                                                                     lora.alpha_rule == "rslora"):
        return None
    # the modules and rank the tensors themselves adapt (peft shortens adapter_config.json's target_modules to
    # suffixes from 20 modules on, so that list is not compared)
    a_shapes = {k[len("base_model.model."): -len(".lora_A.weight")]: v for k, v in adapter_shapes(adapter).items()
                if k.startswith("base_model.model.") and k.endswith(".lora_A.weight")}
    if set(a_shapes) != want.names or {v[0] for v in a_shapes.values()} != {lora.rank}:
        return None
    if not float(summary["timings_s"]["train_s"]) > 0:
        return None
    return summary


def find_trained(cfg: Any, prep: Any) -> Any | None:
    """The adapter of an earlier run in ``cfg.output_dir`` with this run's training, loaded on the base model as a
    :class:`memlens.finetune.Trained`; None when there is none (the caller then trains)."""
    from peft import PeftModel

    from memlens.finetune import Trained, adapter_changed, lora_scalings, run_name, trainable_by_target
    from memlens.models import base_record, check_adapter_base, resolve_targets
    from memlens.provenance import versions

    out = Path(cfg.output_dir)
    target_map = resolve_targets(prep.lm.model, list(cfg.lora.targets))
    want = _Wanted(cfg, cfg.training_hash(), prep.split.manifest["hash"], prep.lm.info, versions(),
                   base_record(prep.lm, target_map), {n for names in target_map.values() for n in names})
    own = run_name(cfg)
    for folder in sorted(out.iterdir()) if out.is_dir() else []:
        if folder.name == own:  # this run's own folder (being redone) is never its own source
            continue
        try:
            summary = _check(folder, want)
            if summary is None:
                continue
            rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line]
            check_adapter_base(prep.lm, folder / "adapter")  # the tensors' shapes, before the base is touched
        except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError, MemlensError):
            continue  # unreadable, being written, or of another memlens: not a source
        t = time.perf_counter()
        try:
            model = PeftModel.from_pretrained(prep.lm.model, str(folder / "adapter"), is_trainable=True)
        except Exception as e:  # the base model may be half-wrapped now: stop rather than train on it
            raise MemlensError(f"{folder / 'adapter'}: passed every check but did not load ({e}); run without "
                               "reuse_training") from None
        model.eval()
        changed = adapter_changed(model)
        log.info("training: reusing the adapter of %s (same training, run %s)", folder.name,
                 summary["config_hash"][:12])
        # the training's seconds as its speed was computed (summary.json's clock is rounded to the millisecond)
        seconds = (float(summary["train_tokens"]) / float(summary["train_tokens_per_s"])
                   if summary.get("train_tokens_per_s") else float(summary["timings_s"]["train_s"]))
        return Trained(model, rows, trainable_by_target(model, target_map), sorted(lora_scalings(model)),
                       dict(target_map), changed, seconds, want.base,
                       reused_from={"run": folder.name, "run_id": summary["config_hash"],
                                    "memlens_git": (summary.get("versions") or {}).get("memlens_git"),
                                    "load_s": round(time.perf_counter() - t, 3)})
    log.warning("reuse_training: no run folder in %s trained this adapter (same training, base, versions and "
                "processor kind); training it", out)
    return None
