"""Kill points: a run killed (as by SIGKILL) anywhere in fine-tuning, reference training, scoring, extraction,
cache or store writes, then resumed, ends with exactly the store an uninterrupted run writes."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("fault_driver.py")

# (point, hit): see fault_driver.py for where each point is
KILL_POINTS = [
    ("train_step", 1), ("train_step", 7), ("train_step", 13), ("train_step", 20), ("train_step", 25),
    ("train_step", 38),
    ("batch", 1), ("batch", 30), ("batch", 60), ("batch", 90),
    ("generate", 1), ("generate", 3),
    ("stats_cache_write", 1), ("stats_cache_write", 2), ("stats_cache_write", 4),
    ("reference_trained", 1), ("reference_trained", 2),
    ("rename", 1), ("rename", 3), ("rename", 6),
    ("store_insert", 1), ("store_insert", 3), ("store_insert", 5),
    ("run_folder", 1), ("run_folder", 2),
]


def _drive(out: Path, point: str, hit: int, cache: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "MEMLENS_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(DRIVER), str(out), point, str(hit)], capture_output=True, text=True,
                          env=env, timeout=600)


def _dump(db: Path) -> dict:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {
            "runs": sorted(r[0] for r in conn.execute("SELECT run_id FROM runs")),
            "samples": sorted(conn.execute("SELECT run_id, sample_id, member, canary_copies FROM samples")),
            "values": sorted(conn.execute('SELECT run_id, sample_id, name, value FROM "values"')),
            "generations": sorted(conn.execute("SELECT run_id, sample_id, decoding, sample, ngram_share, exact, "
                                               "rouge_l, edit_sim, gen_ppl FROM generations")),
            "metrics": sorted((r[0], r[1], r[2], r[3], r[4], r[5]) for r in conn.execute(
                "SELECT run_id, name, subject, value, lo, hi FROM metrics")),
            "summaries": {r[0]: _stable(json.loads(r[1])) for r in conn.execute("SELECT run_id, summary_json FROM runs")},
        }
    finally:
        conn.close()


VOLATILE = {"timings_s", "train_tokens_per_s", "run_dir", "cost", "train_s", "score_s"}  # clocks, not results


def _stable(d):
    if isinstance(d, dict):
        return {k: _stable(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_stable(v) for v in d]
    return d


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    p = _drive(out, "none", 0, out / "cache")
    assert p.returncode == 0, p.stderr[-3000:]
    return _dump(out / "s.sqlite")


@pytest.mark.parametrize("point, hit", KILL_POINTS, ids=[f"{p}-{h}" for p, h in KILL_POINTS])
def test_killed_anywhere_and_resumed_equals_an_uninterrupted_run(tmp_path, baseline, point, hit):
    killed = _drive(tmp_path, point, hit, tmp_path / "cache")
    assert killed.returncode == 137, f"the kill point {point}#{hit} was never reached: {killed.stderr[-2000:]}"
    resumed = _drive(tmp_path, "none", 0, tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _dump(tmp_path / "s.sqlite")
    assert got["runs"] == baseline["runs"] and len(got["runs"]) == 2
    for table in ("samples", "values", "generations", "metrics"):
        assert got[table] == baseline[table], table  # same rows, same values, no duplicates
    for run_id, summary in baseline["summaries"].items():
        differ = sorted(k for k in summary if got["summaries"][run_id].get(k) != summary[k])
        assert not differ, differ


def test_the_suite_counts(capsys):
    with capsys.disabled():
        print(f"\nfault suite: {len(KILL_POINTS)} kill points across "
              f"{len({p for p, _ in KILL_POINTS})} kinds of place")
    assert len(KILL_POINTS) >= 20
