"""Where memlens keeps what it caches (converted models, downloaded corpora, base-model statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MEMLENS_CACHE``, else ``$XDG_CACHE_HOME/memlens``, else ``~/.cache/memlens``."""
    if os.environ.get("MEMLENS_CACHE"):
        return Path(os.environ["MEMLENS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memlens"
