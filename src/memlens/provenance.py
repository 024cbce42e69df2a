"""What every stored result records about how it was made: package versions, git commit, hashes."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("memlens", "torch", "transformers", "peft", "tokenizers", "numpy", "scikit-learn", "scipy", "pydantic")


_AT_START: dict[str, Any] = {}


def versions() -> dict[str, Any]:
    """Versions of Python, the packages and memlens's own commit, read once per process: a run started under one
    commit records that commit, even if the checkout moves on while it computes."""
    if not _AT_START:
        _AT_START.update(_read_versions())
    return dict(_AT_START)


def _read_versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    commit = git_commit()
    if commit:
        out["memlens_git"] = commit
    out["processor"] = processor()
    return out


def processor() -> dict[str, Any]:
    """The CPU's model name, the instruction sets that decide its matrix-product speed (AVX-512, its bf16 and VNNI
    forms, AMX), and the threads torch uses: memlens's speed, and which bf16 path it takes, depend on them."""
    import os

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    fields: dict[str, str] = {}  # "key : value" lines; the first processor's value of each key
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    # the generation behind a shared model name ("AMD EPYC" is Zen 2 to Zen 5): x86's family and model numbers
    family = fields.get("cpu family"), fields.get("model")
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"model": model, "family_model": "/".join(family) if all(family) else None,
            "isa": [f for f in wanted if f in flags], "cores": os.cpu_count(), "torch_threads": threads}


def git_commit() -> str | None:
    """The commit of a development checkout of memlens (with '+dirty' for local changes), else None."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
