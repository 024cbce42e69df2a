"""Trust: nothing of the user's is destroyed, and a store or export path that is not memlens's is refused."""

import os
import sqlite3
import subprocess
import sys

import pytest

from memlens import store as S
from memlens.audit import run_config
from memlens.config import load_config
from memlens.errors import MemlensError
from memlens.finetune import finetune

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=300", "data.members.n=16",
        "data.nonmembers.n=16", "train.batch_size=8", "train.max_steps=2", "audit.bootstrap=0",
        "audit.extraction=null", "audit.blind=false"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memlens", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _one_line_error(p, *words):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


@pytest.mark.parametrize("name", ["/some/folder", ".", "..", "a/b", ".hidden", "x\\y"])
def test_a_run_name_is_a_name_never_a_path(tmp_path, name):
    keep = tmp_path / "runs" / "other-run"
    keep.mkdir(parents=True)
    (keep / "adapter_model.safetensors").write_bytes(b"the user's")
    with pytest.raises(MemlensError, match="plain name"):
        load_config(None, [*BASE, f"output_dir={tmp_path / 'runs'}", f"name={name}"])
    assert (keep / "adapter_model.safetensors").read_bytes() == b"the user's"


def test_a_folder_that_is_not_this_run_is_never_replaced(tmp_path):
    out = tmp_path / "runs"
    first = run_config(load_config(None, [*BASE, f"output_dir={out}", "name=mine"]), progress=False)
    adapter = (first.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    # the same name with another config: refused before any compute, with or without --overwrite
    other = load_config(None, [*BASE, f"output_dir={out}", "name=mine", "lora.rank=2"])
    for overwrite in (False, True):
        with pytest.raises(MemlensError, match="not the folder of this run"):
            run_config(other, overwrite=overwrite, progress=False)
        with pytest.raises(MemlensError, match="not the folder of this run"):
            finetune(other, overwrite=overwrite, progress=False)
    assert (first.run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    # a user's own folder (no run in it) is never replaced either
    user = out / "notes"
    user.mkdir()
    (user / "todo.txt").write_text("mine")
    with pytest.raises(MemlensError, match="not the folder of this run"):
        finetune(load_config(None, [*BASE, f"output_dir={out}", "name=notes"]), overwrite=True, progress=False)
    assert (user / "todo.txt").read_text() == "mine"
    # the same run again: refused without --overwrite, replaced (bit-identical) with it
    same = load_config(None, [*BASE, f"output_dir={out}", "name=mine", "store=" + str(tmp_path / "b.sqlite")])
    with pytest.raises(MemlensError, match="pass --overwrite"):
        run_config(same, progress=False)
    again = run_config(same, overwrite=True, progress=False)
    assert (again.run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    res = run_config(load_config(None, [*BASE, f"output_dir={tmp}"]), progress=False)
    return res.store, res.run_id


def test_export_replaces_only_a_regular_file(stored, tmp_path):
    db, run_id = stored
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    folder = tmp_path / "folder"
    folder.mkdir()
    for out, what in ((link, "symbolic link"), (folder, "folder"), (tmp_path / "null", None)):
        if what is None:
            out = "/dev/null"
            what = "not a regular file"
        p = _cli("results", "export", run_id, "--store", str(db), "--out", str(out))
        _one_line_error(p, what)
    assert target.read_text() == "keep" and link.is_symlink() and not any(folder.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a regular file is replaced; '-' writes CSV to standard output
    ok = tmp_path / "table.csv"
    ok.write_text("old")
    p = _cli("results", "export", run_id, "--store", str(db), "--out", str(ok))
    assert p.returncode == 0 and ok.read_text().startswith("id,member,")
    p = _cli("results", "export", run_id, "--store", str(db), "--out", "-")
    assert p.returncode == 0 and p.stdout.startswith("id,member,") and p.stdout == ok.read_text()


def test_reading_commands_never_change_a_store_or_another_programs_database(stored, tmp_path):
    db, _ = stored
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE contacts (name TEXT)")
        conn.execute("INSERT INTO contacts VALUES ('x')")
    before = other.read_bytes()
    for args in (("results", "list"), ("results", "show", "abc"), ("report", "--out", str(tmp_path / "r"))):
        _one_line_error(_cli(*args, "--store", str(other)), "not a memlens results store")
    assert other.read_bytes() == before and not (tmp_path / "other.sqlite-wal").exists()
    with pytest.raises(MemlensError, match="not a memlens results store"):
        S.connect(other)  # a writing command refuses it too
    assert other.read_bytes() == before
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    _one_line_error(_cli("results", "list", "--store", str(garbage)), "not a memlens results store")
    missing = tmp_path / "missing.sqlite"
    _one_line_error(_cli("results", "list", "--store", str(missing)), "no results store")
    assert not missing.exists()
    # reading a real store leaves it byte-identical
    mtime = os.stat(db).st_mtime_ns
    assert _cli("results", "list", "--store", str(db)).returncode == 0
    assert os.stat(db).st_mtime_ns == mtime
