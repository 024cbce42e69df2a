"""Check before computing: what a run will read and write is checked before any model is loaded.

A user error found after an hour of training is an hour lost, and an error after a store or folder was created
leaves debris. :func:`check_run` finds, before the model loads: a config that cannot run, a run folder that is not
this run's, a store that is not a memlens store or already holds the run, and folders (output, store, cache) that
cannot be written or have no room. Nothing is created here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from memlens.errors import MemlensError

MIN_FREE_BYTES = 200 * 2**20  # a run writes an adapter, a run folder and store rows: a few MB; keep a margin


def _nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: Path, what: str, min_free: int = MIN_FREE_BYTES) -> None:
    """``path`` (a folder, existing or to be created) can be written and its disk has ``min_free`` bytes free."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise MemlensError(f"{what} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise MemlensError(f"{what} {path}: {base} is not writable")
    free = shutil.disk_usage(base).free
    if free < min_free:
        raise MemlensError(f"{what} {path}: only {free / 2**20:.0f} MiB free on its disk (a run needs about "
                           f"{min_free / 2**20:.0f} MiB)")


def check_store(db: Path, run_id: str, overwrite: bool) -> None:
    """The store is a memlens store (or can be created) and does not hold the run (unless ``overwrite``)."""
    from memlens import store as S

    if db.exists():
        conn = S.connect_readonly(db)
        try:
            held = S.run_exists(conn, run_id)
        finally:
            conn.close()
        if held and not overwrite:
            raise MemlensError(f"run {run_id[:12]} is already in {db}: `memlens results show {run_id[:12]} --store "
                               f"{db}` shows it; pass --overwrite to redo it")
        if not os.access(db, os.W_OK):
            raise MemlensError(f"{db}: the results store is not writable")
    check_writable(db.parent, "store folder")


def check_targets(cfg) -> None:
    """The LoRA targets exist in the architecture, read from the model's config.json on the meta device (no
    weights). Models not on disk yet (an alias not converted, a hub id not cached) are checked right after they
    load, still before any scoring or training."""
    if cfg.train.method != "lora":
        return
    from memlens.models import ALIASES, TINY, model_cache, resolve_targets

    if cfg.model in TINY:
        folder = None
    elif cfg.model in ALIASES:
        folder = model_cache(cfg.model)
    else:
        folder = Path(cfg.model).expanduser()
    if folder is None or not (folder / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # an unreadable config is reported when the model loads, with its own message
        return
    resolve_targets(skeleton, list(cfg.lora.targets))


def check_run(cfg, *, overwrite: bool = False) -> None:
    """Everything about a ``memlens run`` that can be checked before the model loads (see the module docstring)."""
    from memlens.audit import store_path
    from memlens.finetune import check_run_folder, run_name
    from memlens.paths import cache_dir

    run_id = cfg.config_hash()
    out = Path(cfg.output_dir)
    check_store(store_path(cfg), run_id, overwrite)
    check_run_folder(out / run_name(cfg), run_id, overwrite)
    check_writable(out, "output_dir")
    check_writable(cache_dir(), "cache")
    check_targets(cfg)
