"""Trust: nothing of the user's is destroyed, and a store or export path that is not memlens's is refused."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from memlens import store as S
from memlens.audit import run_config
from memlens.config import load_config
from memlens.errors import MemlensError
from memlens.finetune import finetune

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=300", "data.members.n=16",
        "data.nonmembers.n=16", "train.batch_size=8", "train.max_steps=2", "audit.bootstrap=0",
        "audit.extraction=null", "audit.blind=false"]


from cli_helpers import cli as _cli  # noqa: E402
from cli_helpers import one_line_error as _one_line_error  # noqa: E402


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


def test_no_plain_text_hash_leaves_memlens_and_files_are_user_only(tmp_path):
    import hashlib
    import stat

    p = _cli("run", "/dev/null", cwd=tmp_path)  # (a config path that is not a file: one line, nothing written)
    _one_line_error(p, "config file not found")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\ndata: {source: synthetic, synthetic_size: 300, members: {n: 16}, nonmembers: {n: 16}}\n"
                   "train: {batch_size: 8, max_steps: 2}\naudit: {bootstrap: 0, extraction: null, blind: false}\n")
    p = _cli("run", str(cfg), f"output_dir={tmp_path / 'runs'}", "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    db = tmp_path / "runs" / "memlens.sqlite"
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
    for path in (db, run_dir / "summary.json", run_dir / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    from memlens.data import load_corpus, make_split

    conf = load_config(cfg)
    split = make_split(load_corpus(conf.data), conf.data)
    plain = {hashlib.sha256(r.text.encode()).hexdigest() for r in split.members + split.nonmembers}
    with sqlite3.connect(db) as conn:
        stored = {r[0] for r in conn.execute("SELECT text_hash FROM samples")}
        secret = conn.execute("SELECT value FROM meta WHERE key = 'text_key'").fetchone()[0]
    assert len(stored) == 32 and not stored & plain  # keyed: a guessed sentence's SHA-256 finds nothing
    out = tmp_path / "export.csv"
    assert _cli("results", "export", run_dir.name.rsplit("-", 1)[-1], "--store", str(db), "--out", str(out)).returncode == 0
    text = out.read_text() + (run_dir / "manifest.json").read_text()
    assert "text_hash" not in out.read_text().splitlines()[0] and secret not in text
    assert not any(h in text for h in plain)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rep = _cli("report", "--store", str(db), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "rep" / "report.html").stat().st_mode) == 0o600


def test_a_store_written_before_keyed_hashes_is_rekeyed(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = S.connect(db)
    conn.execute("DELETE FROM meta")
    conn.execute("INSERT INTO samples VALUES ('r', 's', 1, 'abc123', 1, NULL)")
    conn.commit()
    conn.close()
    conn = S.connect(db)
    (h,) = conn.execute("SELECT text_hash FROM samples").fetchone()
    assert h != "abc123" and len(h) == 64
    assert h == S._keyed(conn.execute("SELECT value FROM meta").fetchone()[0], "abc123")


def test_a_studys_workers_die_with_it(tmp_path):
    import signal
    import time

    psutil = pytest.importorskip("psutil")
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nbase: {model: tiny, data: {source: synthetic, synthetic_size: 300, members: {n: 16}, "
                     "nonmembers: {n: 16}}, train: {batch_size: 8, max_steps: 100000}, audit: {extraction: null}}\n"
                     "axes: {lora.rank: [1, 2]}\n")
    proc = subprocess.Popen([sys.executable, "-m", "memlens", "study", str(study), "--store", str(tmp_path / "s.db"),
                             "--output-dir", str(tmp_path / "runs"), "-q"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 120
    children = []
    while time.time() < deadline and not children:
        children = [c for c in parent.children(recursive=True) if "spawn" in " ".join(c.cmdline())]
        time.sleep(0.5)
    assert children, "the study started no worker"
    time.sleep(3)  # the worker is training now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [c.pid for c in alive]


def test_loading_a_model_never_installs_anything(monkeypatch):
    import memlens.models as models

    monkeypatch.setattr(models, "_gguf_file", lambda name, required=True: None)
    monkeypatch.setattr(models, "model_cache", lambda name: Path("/nonexistent/memlens-model"))
    monkeypatch.setattr(models, "install_packages", lambda name: pytest.fail("pip ran at run time"))
    with pytest.raises(MemlensError, match="memlens models prepare smollm2-135m"):
        models.load_model("smollm2-135m")


def test_a_run_stored_by_another_study_meanwhile_is_kept(tmp_path, monkeypatch):
    import memlens.study as study_mod
    from memlens.study import StudyConfig, plan, run_study

    st = StudyConfig.model_validate({"name": "a", "base": {"model": "tiny", "data": {
        "source": "synthetic", "synthetic_size": 300, "members": {"n": 16}, "nonmembers": {"n": 16}},
        "train": {"batch_size": 8, "max_steps": 1}, "audit": {"bootstrap": 0, "extraction": None, "blind": False}},
        "axes": {"lora.rank": [1]}})
    runs = plan(st, None, [], str(tmp_path / "runs"))
    db = tmp_path / "s.sqlite"
    first = run_study(st, runs, db, progress=False)
    real_done = study_mod.done_runs
    calls = {"n": 0}

    def done_once_empty(path):  # the second study starts before the first has stored its run
        calls["n"] += 1
        return set() if calls["n"] == 1 else real_done(path)

    monkeypatch.setattr(study_mod, "done_runs", done_once_empty)
    again = run_study(st, runs, db, progress=False)  # computes it again, finds it stored: keeps the first
    assert again == first
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_the_precision_a_run_ran_at_is_stored_and_in_its_id(stored):
    db, run_id = stored
    with sqlite3.connect(db) as conn:
        config = json.loads(conn.execute("SELECT config_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0])
    resolved = config["resolved"]
    assert resolved["device"] == "cpu" and resolved["train_precision"] in ("bfloat16", "float32")
    cfg = load_config(None, [*BASE, "train.precision=float32", "audit.precision=float32"])
    if resolved["train_precision"] == "bfloat16":  # auto resolved to bf16 here: float32 is another run
        assert cfg.config_hash() != run_id


def test_the_statistics_cache_holds_no_plain_hash_of_a_record(tmp_path, tiny):
    import hashlib
    import os

    import numpy as np

    import memlens.audit as A
    from memlens.config import AuditConfig

    seqs = tiny.encode(["A 54-year-old woman developed hepatitis on isoniazid.", "Another sentence here."])
    A.cached_score(tiny, tiny.model, seqs, AuditConfig(precision="float32"), tiny.pad_id, identity="plain-check")
    files = list((Path(os.environ["MEMLENS_CACHE"]) / "stats").glob("*.npz"))
    assert files and (Path(os.environ["MEMLENS_CACHE"]) / "stats" / ".key").stat().st_mode & 0o077 == 0
    plain = {hashlib.sha256(np.asarray(s, dtype=np.int64).tobytes()).hexdigest()[:32] for s in seqs}
    for f in files:
        with np.load(f) as z:
            assert not plain & set(z["hashes"].tolist())


@pytest.fixture(scope="module")
def cache_seen_by_a_module_fixture():
    from memlens.paths import cache_dir

    return cache_dir()


def test_module_fixtures_never_use_the_users_cache(cache_seen_by_a_module_fixture, tmp_path_factory):
    """A run made once for a module's tests (module-scoped fixture) scores into a cache of the test session's own."""
    base = tmp_path_factory.getbasetemp().resolve()
    assert cache_seen_by_a_module_fixture.resolve().is_relative_to(base)
