import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import cli, one_line_error

from memlens.errors import MemlensError
from memlens.study import load_study, plan, run_study, shipped_studies

STUDY = """
name: t
base:
  model: tiny
  data: {source: synthetic, synthetic_size: 300, members: {n: 12}, nonmembers: {n: 12}}
  train: {epochs: 2, batch_size: 4}
  audit: {bootstrap: 50, extraction: {n: 4}}
axes:
  lora.targets: [[q], [v], [o]]
profiles:
  quick: {set: {train.epochs: 1}}
  two: {axes: {lora.targets: [[q], [k]], lora.rank: [1, 2]}}
  seeds: {axes: {lora.targets: [[q], [v]], train.seed: [0, 1]}}
  matched: {match_params: {reference: [q], rank: 4}, axes: {lora.targets: [[q], [k], [q, k]]}}
"""


def _study(tmp_path) -> Path:
    p = tmp_path / "t.yaml"
    p.write_text(STUDY)
    return p


def test_expansion_profiles_and_ids(tmp_path):
    st = load_study(_study(tmp_path))
    runs = plan(st)
    assert [r.label for r in runs] == ["lora.targets=[q]", "lora.targets=[v]", "lora.targets=[o]"]
    assert len({r.run_id for r in runs}) == 3
    assert all(r.run_id == r.config.config_hash() for r in runs)
    assert {r.config.train.epochs for r in plan(st, "quick")} == {1.0}
    two = plan(st, "two")
    assert [(r.config.lora.targets, r.config.lora.rank) for r in two] == [(["q"], 1), (["q"], 2), (["k"], 1),
                                                                          (["k"], 2)]
    assert plan(st, None, ["train.seed=3"])[0].config.train.seed == 3
    seeds = plan(st, "seeds")  # seed axes vary slowest; names and labels keep the study's order
    assert [(r.config.train.seed, r.config.lora.targets) for r in seeds] == [
        (0, ["q"]), (0, ["v"]), (1, ["q"]), (1, ["v"])]
    assert seeds[0].label == "lora.targets=[q] train.seed=0" and "-targetsq-seed0-" in seeds[0].config.name
    with pytest.raises(MemlensError, match="no profile 'nope'"):
        plan(st, "nope")
    with pytest.raises(MemlensError, match="unknown key 'train.epoch'"):
        plan(st, None, ["train.epoch=3"])


def test_parameter_matching_picks_ranks_per_target(tmp_path):
    runs = plan(load_study(_study(tmp_path)), "matched")
    ranks = {tuple(r.config.lora.targets): r.config.lora.rank for r in runs}
    # tiny Llama: q is 64 -> 64, k is 64 -> 32 per layer; q at rank 4 = 2 * 4 * 128 = 1024 parameters
    assert ranks == {("q",): 4, ("k",): round(1024 / (2 * 96)), ("q", "k"): round(1024 / (2 * 224))}


def test_shipped_studies_expand(phee_dir):
    names = set(shipped_studies())
    assert {"paper-table-3.1", "paper-rank", "paper-canary", "paper-perplexity", "demo"} <= names
    expect = {("paper-table-3.1", "quick"): 15, ("paper-table-3.1", "full"): 15, ("paper-rank", "full"): 20,
              ("paper-rank", "quick"): 8, ("paper-canary", "full"): 18, ("paper-perplexity", "full"): 100,
              ("paper-perplexity", "quick"): 1}
    for (name, profile), n in expect.items():
        runs = plan(load_study(name), profile, [f"data.path={phee_dir}"])
        assert len(runs) == n, (name, profile)
    full = plan(load_study("paper-table-3.1"), "full", [f"data.path={phee_dir}"])[0].config
    assert (full.train.batch_size, full.train.grad_accum, full.train.warmup_steps, full.lora.alpha) == (16, 4, 100, 16)
    assert full.data.members.n is None and full.data.nonmembers.split == "test"
    seeds = plan(load_study("paper-table-3.1"), "seeds", [f"data.path={phee_dir}"])
    assert [(r.config.train.seed, r.config.lora.targets) for r in seeds[:6]] == [
        (0, ["q"]), (0, ["k"]), (0, ["v"]), (0, ["o"]), (0, ["q", "k"]), (1, ["q"])]
    # fixed precision: the same run ids on a processor of any kind, so that any machine resumes the study
    assert {(r.config.resolved()["train_precision"], r.config.resolved()["audit_precision"]) for r in seeds} == {
        ("float32", "float32")}
    rank = plan(load_study("paper-rank"), "full", [f"data.path={phee_dir}"])
    assert sorted({r.config.lora.rank for r in rank}) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert {r.config.lora.alpha_rule for r in rank} == {"fixed", "rslora"}


def _metrics(db: Path) -> dict:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT run_id, name, subject, value FROM metrics WHERE name IN ('auc', 'tpr@0.1') "
                        "ORDER BY run_id, name, subject").fetchall()
    return {(r, n, s): v for r, n, s, v in rows}


def test_killed_study_resumes_without_redoing_runs(tmp_path):
    study = _study(tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "memlens", "study", str(study), "--quiet"]
    db = tmp_path / "a.sqlite"
    p = subprocess.Popen([*cmd, "--store", str(db), "--output-dir", str(tmp_path / "a")], env=env,
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        if db.is_file() and sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] >= 1:
            break
    os.killpg(p.pid, signal.SIGKILL)  # the study and its worker process, mid-way
    p.wait()
    n_before = sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert 1 <= n_before < 3
    out = subprocess.run([*cmd, "--store", str(db), "--output-dir", str(tmp_path / "a")], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{3 - n_before} runs executed now, 3 in all" in out.stdout.replace("\n", " ")
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM runs").fetchone() == (3, 3)
    # the same study, uninterrupted, in another store: the same metrics
    db2 = tmp_path / "b.sqlite"
    out = subprocess.run([*cmd, "--store", str(db2), "--output-dir", str(tmp_path / "b")], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _metrics(db) == _metrics(db2) and len(_metrics(db)) == 3 * 8 * 2


def test_ray_executor_runs_a_tiny_study_on_a_local_cluster(tmp_path):
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    st = load_study(_study(tmp_path))
    runs = plan(st, "quick", [], str(tmp_path / "ray-runs"))[:2]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        done = run_study(st, runs, tmp_path / "ray.sqlite", executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert sorted(done) == sorted(r.run_id for r in runs)
    local = run_study(st, runs, tmp_path / "local.sqlite", executor="local", progress=False)
    assert sorted(local) == sorted(done)
    assert _metrics(tmp_path / "ray.sqlite") == _metrics(tmp_path / "local.sqlite")
    conn = sqlite3.connect(tmp_path / "ray.sqlite")
    assert {r[0] for r in conn.execute("SELECT study FROM runs")} == {"t"}


def _store_as_done(db: Path, study: str, run) -> None:
    """Store a planned run the way a study stores it (config with its resolution, the data manifest)."""
    from memlens import store as S
    from memlens.data import load_corpus, make_split

    cfg = run.config
    conn = S.connect(db)
    S.write_run(conn, {"run_id": run.run_id, "name": cfg.name, "study": study,
                       "config": {**cfg.model_dump(mode="json"), "resolved": cfg.resolved()},
                       "config_hash": run.run_id, "manifest_hash": make_split(load_corpus(cfg.data), cfg.data).manifest[
                           "hash"], "versions": {}, "seed": cfg.train.seed, "timings": {}}, [], [], [], [])
    conn.close()


def test_resume_refuses_the_same_data_spelt_otherwise_and_data_that_changed(tmp_path, monkeypatch):
    from memlens.resume import check_resume

    (tmp_path / "d").mkdir()
    corpus = tmp_path / "d" / "c.jsonl"
    corpus.write_text("".join(f'{{"text": "sentence number {i} of the corpus"}}\n' for i in range(40)))
    st = load_study(_study(tmp_path))
    sized = ["data.members.n=10", "data.nonmembers.n=10"]
    runs = plan(st, None, [f"data.source=jsonl:{corpus}", *sized])
    db = tmp_path / "s.sqlite"
    _store_as_done(db, st.name, runs[0])
    check_resume(st.name, runs, db)  # the same spelling: resumes
    monkeypatch.chdir(tmp_path)
    relative = plan(st, None, ["data.source=jsonl:d/c.jsonl", *sized])
    assert relative[0].run_id != runs[0].run_id  # the path as written is part of the run id
    before = db.read_bytes()
    with pytest.raises(MemlensError, match="made with data.source jsonl:/") as e:
        check_resume(st.name, relative, db)
    assert f"resume with data.source=jsonl:{corpus} " in str(e.value) and "jsonl:d/c.jsonl here" in str(e.value)
    p = cli("study", str(_study(tmp_path)), "data.source=jsonl:d/c.jsonl", *sized, "--store", str(db), "--dry-run",
            cwd=tmp_path)
    one_line_error(p, f"resume with data.source=jsonl:{corpus}")
    assert db.read_bytes() == before
    # other data at another path are other runs: no objection
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "c.jsonl").write_text(corpus.read_text().replace("number 3 ", "number three "))
    check_resume(st.name, plan(st, None, ["data.source=jsonl:e/c.jsonl", *sized]), db)
    # the data changed under the stored run's path: refused, whichever spelling
    corpus.write_text(corpus.read_text().replace("number 7 ", "number seven "))
    with pytest.raises(MemlensError, match=f"run {runs[0].config.name} of study t is there, made on other data "
                       "than data.source jsonl:/"):
        check_resume(st.name, runs, db)
    # a store without runs of this study, or no store: nothing to check
    check_resume(st.name, runs, tmp_path / "none.sqlite")


def test_resume_with_phee_spelt_otherwise_unset_or_unreadable(tmp_path, monkeypatch, phee_dir):
    from memlens.resume import check_resume

    folder = tmp_path / "phee"  # the first 40 sentences of each PHEE split
    folder.mkdir()
    for split in ("train", "dev", "test"):
        lines = (phee_dir / f"{split}.json").read_text().splitlines()[:40]
        (folder / f"{split}.json").write_text("\n".join(lines) + "\n")
    st = load_study(_study(tmp_path))
    sized = ["data.source=phee", "data.members.n=10", "data.nonmembers.n=10"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMLENS_PHEE_DIR", str(folder))
    unset = plan(st, None, sized)  # PHEE found through $MEMLENS_PHEE_DIR
    db = tmp_path / "s.sqlite"
    _store_as_done(db, st.name, unset[1])
    with pytest.raises(MemlensError, match=r"made with data.path unset \(\$MEMLENS_PHEE_DIR or the cache\), the same "
                       r"data as data.path phee here.*resume with data.path left out"):
        check_resume(st.name, plan(st, None, [*sized, "data.path=phee"]), db)
    # once a run of these is in the store, the same data spelt otherwise are an earlier mistake, not these runs
    absolute = plan(st, None, [*sized, f"data.path={folder}"])
    _store_as_done(db, st.name, absolute[0])
    check_resume(st.name, absolute, db)
    # stored runs this machine cannot resolve (CUDA, recorded or not) or not memlens configs are passed over
    conn = sqlite3.connect(db)
    cuda = {**unset[2].config.model_dump(mode="json"), "train": {**unset[2].config.train.model_dump(mode="json"),
                                                                 "device": "cuda"}}
    for rid, config in (("c1", {**cuda, "resolved": {"device": "cuda", "train_precision": "bfloat16",
                                                      "audit_precision": "bfloat16"}}), ("c2", cuda), ("c3", [1, 2])):
        conn.execute("INSERT INTO runs (run_id, study, config_json, manifest_hash) VALUES (?, 't', ?, 'x')",
                     (rid, json.dumps(config)))
    conn.commit()
    conn.close()
    check_resume(st.name, unset, tmp_path / "s.sqlite")
    # data that cannot be read: a dry run lists the runs with a warning, a resume is refused before any work
    monkeypatch.delenv("MEMLENS_PHEE_DIR")
    p = cli("study", str(_study(tmp_path)), *sized, f"data.path={tmp_path / 'gone'}", "--store", str(db),
            "--dry-run", cwd=tmp_path)
    assert p.returncode == 0 and "were not checked against the data" in p.stderr + p.stdout, p.stderr
    (folder / "train.json").rename(folder / "train.json.away")
    with pytest.raises(MemlensError, match="cannot check its runs of study t against the data: .*train.json"):
        check_resume(st.name, absolute, db)


def test_a_study_says_when_a_runs_training_went_on_from_a_saved_state(tmp_path, monkeypatch, caplog):
    import logging

    import memlens.study as S

    runs = plan(load_study(_study(tmp_path)), None, [f"output_dir={tmp_path / 'runs'}"])[:2]
    stored = []

    def execute(todo, *a):  # two finished runs, the second's training continued from step 3 (memlens.training_state)
        for r, resumed in zip(todo, (None, 3)):
            summary = {"steps": 6, **({"resumed_training_at_step": resumed} if resumed is not None else {})}
            yield {"run": {"run_id": r.run_id, "summary": summary}}

    monkeypatch.setattr(S, "_execute", execute)
    monkeypatch.setattr("memlens.audit.store_record", lambda db, record: stored.append(record))
    with caplog.at_level(logging.INFO, logger="memlens.study"):
        run_study(load_study(_study(tmp_path)), runs, tmp_path / "s.sqlite", progress=False)
    assert len(stored) == 2
    said = [m for m in caplog.messages if "went on" in m]
    assert said == [f"run {runs[1].run_id[:12]}: its training went on from step 3 of 6, saved by an interrupted try"]


def test_a_studys_runs_show_their_loops_and_keep_their_numbers(tmp_path, monkeypatch, caplog):
    """A local worker sends its loops' progress and its log records to the study's process (memlens.progress): a
    loop that took at least LOGGED_S gets a line naming the run (0 here: every loop), and the run's numbers are those
    of a study that shows nothing."""
    import logging

    import memlens.progress as P

    st = load_study(_study(tmp_path))
    runs = plan(st, "quick", [], str(tmp_path / "runs"))[:1]
    monkeypatch.setattr(P, "LOGGED_S", 0.0)
    with caplog.at_level(logging.INFO, logger="memlens"):
        run_study(st, runs, tmp_path / "shown.sqlite", progress=True)
    label = runs[0].label
    said = [m for m in caplog.messages if m.startswith(f"run {label}: ")]
    steps = sqlite3.connect(tmp_path / "shown.sqlite").execute("SELECT summary_json FROM runs").fetchone()[0]
    steps = json.loads(steps)["steps"]
    assert f"run {label}: train {steps} of {steps} steps in" in " ".join(said), said
    assert any(m.startswith(f"run {label}: score fine-tuned 24 of 24 seq in ") for m in said), said
    quiet = plan(st, "quick", [], str(tmp_path / "quiet-runs"))[:1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="memlens"):
        run_study(st, quiet, tmp_path / "quiet.sqlite", progress=False)
    assert not [m for m in caplog.messages if m.startswith(f"run {label}: ")]
    assert _metrics(tmp_path / "shown.sqlite") == _metrics(tmp_path / "quiet.sqlite")
    assert len(_metrics(tmp_path / "shown.sqlite")) == 8 * 2


def _a_worker_that_logs_and_loops() -> int:
    import logging

    from memlens.progress import progress_bar

    logging.getLogger("memlens.somewhere").info("a worker's line")
    logging.getLogger("memlens.somewhere").debug("below the study's level")
    with progress_bar("count", 3, unit="things", fields={"x": "-"}) as advance:
        for i in range(3):
            advance(1, x=str(i))
    return 7


def test_a_workers_log_lines_and_loops_reach_the_study(caplog):
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import memlens.study as S

    class Lines(list):
        closed = False

        def __call__(self, event):
            self.append(event)

        def close(self):
            self.closed = True

    ctx = multiprocessing.get_context("spawn")
    events, lines = ctx.Queue(), Lines()
    relay = S._Relay(events, lines)
    with caplog.at_level(logging.INFO, logger="memlens"):
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=S._forward_to_study,
                                     initargs=(events, logging.INFO, True)) as pool:
                assert pool.submit(_a_worker_that_logs_and_loops).result() == 7
        finally:
            relay.stop()
    assert "a worker's line" in caplog.messages and "below the study's level" not in caplog.messages
    assert [r.name for r in caplog.records if r.message == "a worker's line"] == ["memlens.somewhere"]
    assert lines[0] == ("start", "count", 3, 0, "things")
    assert lines[-2] == ("update", 3, {"x": "2"}) and lines[-1][:5] == ("end", "count", 3, 3, "things")
    assert lines.closed


def test_a_relay_that_cannot_show_an_event_goes_on_reading(caplog):
    """An item the study cannot show must not stop the reading: a worker whose queue is full cannot exit."""
    import logging
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    import memlens.study as S

    class Broken:
        def __call__(self, event):
            raise ValueError("cannot show it")

        def close(self):
            pass

    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    relay = S._Relay(events, Broken())
    with caplog.at_level(logging.INFO, logger="memlens"):
        pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=S._forward_to_study,
                                   initargs=(events, logging.INFO, True))
        try:
            assert pool.submit(_a_worker_that_fills_its_queue).result() == 3000
            workers = list(pool._processes.values())
            closing = threading.Thread(target=pool.shutdown, daemon=True)
            closing.start()
            closing.join(60)
            stuck = closing.is_alive()
            for w in workers if stuck else []:
                w.kill()  # what a relay that stopped reading would do to a study: it would wait for ever
        finally:
            relay.stop()
    assert not stuck, "the worker could not exit: its queue was not read"
    assert not relay.thread.is_alive()
    assert [m for m in caplog.messages if "could not be shown" in m] == [
        "the run's progress could not be shown (ValueError: cannot show it); the run goes on"]
    assert sum(m.startswith("line ") for m in caplog.messages) == 3000  # every log record after the failure too


def _a_worker_that_fills_its_queue() -> int:
    import logging

    from memlens.progress import progress_bar

    with progress_bar("count", 1, unit="things") as advance:
        advance(1)
    for i in range(3000):  # about 1 MB: far more than a pipe holds
        logging.getLogger("memlens.somewhere").info("line %d %s", i, "x" * 300)
    return 3000
