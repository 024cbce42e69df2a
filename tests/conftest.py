import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def phee_dir() -> Path:
    """The PHEE folder: $MEMLENS_PHEE_DIR (set by .ci/run and `make test`), else ../shared/data/phee."""
    folder = Path(os.environ.get("MEMLENS_PHEE_DIR") or ROOT.parent / "shared" / "data" / "phee")
    if not (folder / "train.json").is_file():
        pytest.fail(f"PHEE not found at {folder}: set MEMLENS_PHEE_DIR")
    return folder


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """A module's own empty memlens cache for its module-scoped fixtures (a run shared by the module's tests): pytest
    sets up wider-scoped fixtures before the per-test one below, so without this they wrote to the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEMLENS_CACHE", str(tmp_path_factory.mktemp("module-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty memlens cache unless it asks for the shared model cache."""
    monkeypatch.setenv("MEMLENS_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny():
    from memlens.models import build_tiny

    return build_tiny()
