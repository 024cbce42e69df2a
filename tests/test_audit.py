import csv
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import memlens.audit as A
from memlens import store as S
from memlens.audit import audit_adapter, run_config
from memlens.config import AuditConfig, load_config

BASE = ["model=tiny", "data.source=synthetic", "data.synthetic_size=400", "train.batch_size=8",
        "audit.bootstrap=100", "audit.extraction.n=16"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*BASE, f"output_dir={tmp_path}", *extra])


def _auc(conn, run_id, attack):
    return conn.execute("SELECT value FROM metrics WHERE run_id=? AND name='auc' AND subject=?",
                        (run_id, attack)).fetchone()[0]


def test_memorized_members_give_auc_near_one_and_exact_extraction(tmp_path):
    cfg = _cfg(tmp_path, "data.members.n=8", "data.nonmembers.n=32", "train.method=full", "train.epochs=100",
               "train.lr=1e-2", "train.warmup_steps=5")
    res = run_config(cfg, progress=False)
    att = res.summary["attacks"]
    for a in ("loss", "ref_ratio", "ref_diff", "min_k", "min_k_ref"):
        assert att[a]["auc"] > 0.97, a
    ex = {(r["decoding"], r["measure"]): r for r in res.summary["extraction"]}
    assert ex[("greedy", "exact")]["members"] == 1.0  # every member comes back verbatim from its first half
    assert ex[("greedy", "exact")]["nonmembers"] == 0.0
    assert ex[("greedy", "ngram_share")]["difference"] > 0.8


def test_untrained_adapter_gives_auc_near_half(tmp_path):
    # one optimizer step at warm-up lr 0: the adapter's B stays zero, the model is the base model
    cfg = _cfg(tmp_path, "data.members.n=48", "data.nonmembers.n=48", "train.max_steps=1",
               "audit.extraction=null")
    res = run_config(cfg, progress=False)
    att = res.summary["attacks"]
    assert res.summary["adapter_changed"] is False
    assert att["ref_ratio"]["auc"] == 0.5 and att["ref_diff"]["auc"] == 0.5  # every score ties
    assert att["min_k_ref"]["auc"] == 0.5
    for a in ("loss", "zlib", "min_k", "min_k_pp"):  # attacks without the reference see only chance differences
        assert 0.35 < att[a]["auc"] < 0.65, a
    assert att["loss"]["auc_lo"] < 0.5 < att["loss"]["auc_hi"]


def test_stored_auc_equals_auc_recomputed_from_the_export(tmp_path):
    cfg = _cfg(tmp_path, "data.members.n=24", "data.nonmembers.n=24", "train.epochs=20", "train.lr=1e-2",
               "lora.targets=[q, v, o]", "lora.rank=8")
    res = run_config(cfg, progress=False)
    conn = S.connect(res.store)
    out = S.export(conn, res.run_id, "csv", tmp_path / "x.csv")
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 48
    for col in ("id", "member", "n_tokens", "nll_base", "nll_ft", "score_ref_ratio", "score_loss"):
        assert col in rows[0]
    y = np.array([int(r["member"]) for r in rows])
    assert y.sum() == 24
    for attack in AuditConfig().attacks:
        s = np.array([float(r[f"score_{attack}"]) for r in rows])
        assert _auc(conn, res.run_id, attack) == pytest.approx(roc_auc_score(y, s), abs=1e-12), attack
    nll_base = np.array([float(r["nll_base"]) for r in rows])
    nll_ft = np.array([float(r["nll_ft"]) for r in rows])
    assert np.allclose(np.array([float(r["score_ref_ratio"]) for r in rows]), nll_base / nll_ft)
    pq = pytest.importorskip("pyarrow.parquet")
    t = pq.read_table(S.export(conn, res.run_id, "parquet", tmp_path / "x.parquet")).to_pydict()
    assert t["score_ref_diff"] == pytest.approx([float(r["score_ref_diff"]) for r in rows])
    # provenance is stored with the run
    run = S.get_run(conn, res.run_id)
    assert run["config_hash"] == cfg.config_hash() and run["versions"]["torch"] and run["seed"] == 0
    assert run["manifest_hash"] == json.loads((res.run_dir / "manifest.json").read_text())["hash"]
    # raw text stays out unless asked
    assert conn.execute("SELECT COUNT(*) FROM samples WHERE text IS NOT NULL").fetchone()[0] == 0
    with pytest.raises(Exception, match="already in"):
        run_config(cfg, progress=False)


def test_same_config_and_seed_give_the_same_numbers(tmp_path):
    a = run_config(_cfg(tmp_path / "a", "data.members.n=16", "data.nonmembers.n=16", "train.epochs=3"),
                   progress=False)
    b = run_config(_cfg(tmp_path / "b", "data.members.n=16", "data.nonmembers.n=16", "train.epochs=3"),
                   progress=False)
    assert a.run_id == b.run_id
    # compared as JSON (floats written exactly): a missing interval is nan, and nan != nan under ==
    for att in a.summary["attacks"]:
        assert json.dumps(a.summary["attacks"][att], sort_keys=True) == json.dumps(b.summary["attacks"][att],
                                                                                    sort_keys=True)
    assert json.dumps(a.summary["extraction"], sort_keys=True) == json.dumps(b.summary["extraction"], sort_keys=True)
    assert any(r["difference_by"] != "none" for r in a.summary["extraction"])  # the numbers compared are there


def test_base_statistics_are_computed_once(tmp_path, monkeypatch):
    calls = []
    real = A.score

    def counting(model, seqs, **kw):
        calls.append(len(seqs))
        return real(model, seqs, **kw)

    monkeypatch.setattr(A, "score", counting)
    common = ["data.members.n=16", "data.nonmembers.n=16", "train.epochs=1", "audit.extraction=null"]
    run_config(_cfg(tmp_path, *common, "lora.targets=[q]"), progress=False)
    assert calls == [32, 32]  # base (all new), then fine-tuned
    run_config(_cfg(tmp_path, *common, "lora.targets=[v]"), progress=False)
    assert calls == [32, 32, 32]  # base from the cache, only the fine-tuned model scored


def test_audit_of_an_adapter_trained_elsewhere_matches_the_run(tmp_path):
    cfg = _cfg(tmp_path, "data.members.n=16", "data.nonmembers.n=16", "train.epochs=10", "train.lr=1e-2",
               "audit.extraction=null")
    res = run_config(cfg, progress=False)
    from memlens.data import load_corpus, make_split

    split = make_split(load_corpus(cfg.data), cfg.data)
    for name, recs in (("m.jsonl", split.members), ("n.jsonl", split.nonmembers)):
        (tmp_path / name).write_text("".join(json.dumps({"id": r.id, "text": r.text}) + "\n" for r in recs))
    aud = audit_adapter("tiny", str(res.run_dir / "adapter"), str(tmp_path / "m.jsonl"), str(tmp_path / "n.jsonl"),
                        AuditConfig(bootstrap=0, extraction=None), db=tmp_path / "audit.sqlite")
    for a, row in res.summary["attacks"].items():
        assert aud.summary["attacks"][a]["auc"] == pytest.approx(row["auc"], abs=1e-9), a


def test_a_failed_write_leaves_no_rows(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "data.members.n=8", "data.nonmembers.n=8", "train.epochs=1", "audit.extraction=null")
    real_dumps = json.dumps
    seen = []

    class Boom:
        @staticmethod
        def dumps(*a, **k):
            seen.append(1)
            if len(seen) == 6:  # after the run row, inside the metrics rows
                raise RuntimeError("interrupted")
            return real_dumps(*a, **k)

        loads = staticmethod(json.loads)

    monkeypatch.setattr(S, "json", Boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_config(cfg, progress=False)
    conn = sqlite3.connect(tmp_path / "memlens.sqlite")
    for t in ("runs", "samples", '"values"', "generations", "metrics"):
        assert conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] == 0, t


KILL_SCRIPT = r"""
import json, os, signal, sys
import memlens.store as S
from memlens.audit import run_config
from memlens.config import load_config
real, n = json.dumps, [0]
class Killer:
    loads = staticmethod(json.loads)
    @staticmethod
    def dumps(*a, **k):
        n[0] += 1
        if n[0] == 6:
            os.kill(os.getpid(), signal.SIGKILL)  # dies inside the transaction, after rows were inserted
        return real(*a, **k)
S.json = Killer
run_config(load_config(None, sys.argv[1:]), progress=False)
"""


def test_a_run_killed_mid_write_leaves_no_rows(tmp_path):
    args = [*BASE, f"output_dir={tmp_path}", "data.members.n=8", "data.nonmembers.n=8", "train.epochs=1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True, text=True, env=env)
    assert p.returncode == -9, p.stderr
    conn = sqlite3.connect(tmp_path / "memlens.sqlite")
    for t in ("runs", "samples", '"values"', "generations", "metrics"):
        assert conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] == 0, t


def test_cli_run_results_list_show_export(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\ndata: {source: synthetic, synthetic_size: 200, members: {n: 12}, "
                   "nonmembers: {n: 12}}\ntrain: {epochs: 2, batch_size: 4}\naudit: {bootstrap: 50, "
                   "extraction: {n: 4}}\n")

    def memlens(*args):
        return subprocess.run([sys.executable, "-m", "memlens", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path)

    out = memlens("run", str(cfg), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "ref_ratio" in out.stdout and "TPR@1%FPR" in out.stdout and "held-out" in out.stdout
    store = str(tmp_path / "runs" / "memlens.sqlite")
    out = memlens("results", "list", "--store", store)
    assert out.returncode == 0 and "tiny-v-r1" in out.stdout
    run_id = S.list_runs(S.connect(store))[0]["run_id"]
    out = memlens("results", "show", run_id[:8], "--store", store, "--json")
    data = json.loads(out.stdout)
    assert data["run_id"] == run_id and any(m["name"] == "auc" for m in data["metrics"])
    out = memlens("results", "export", run_id[:8], "--format", "csv", "--out", "x.csv", "--store", store)
    assert out.returncode == 0 and (tmp_path / "x.csv").read_text().startswith("id,member,")
    out = memlens("results", "show", "nope", "--store", store)
    assert out.returncode == 2 and "no run 'nope'" in out.stderr


def test_cli_audit_of_an_adapter_folder(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cfg = _cfg(tmp_path, "data.members.n=12", "data.nonmembers.n=12", "train.epochs=3", "audit.extraction=null")
    res = run_config(cfg, progress=False)
    from memlens.data import load_corpus, make_split

    split = make_split(load_corpus(cfg.data), cfg.data)
    (tmp_path / "m.csv").write_text("id,text\n" + "".join(f'{r.id},"{r.text}"\n' for r in split.members))
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"id": r.id, "text": r.text}) + "\n"
                                              for r in split.nonmembers))
    args = [sys.executable, "-m", "memlens", "audit", "--model", "tiny", "--adapter", str(res.run_dir / "adapter"),
            "--members", "m.csv", "--nonmembers", "n.jsonl", "--store", "a.sqlite", "audit.extraction=null",
            "audit.bootstrap=0"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    conn = S.connect(tmp_path / "a.sqlite")
    run_id = S.list_runs(conn)[0]["run_id"]
    assert _auc(conn, run_id, "ref_ratio") == pytest.approx(res.summary["attacks"]["ref_ratio"]["auc"], abs=1e-9)
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2 and "already in" in out.stderr
    (tmp_path / "bad").mkdir()
    out = subprocess.run([*args[:7], str(tmp_path / "bad"), *args[8:]], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 2 and "not an adapter folder" in out.stderr


def test_half_precision_statistics_never_depend_on_the_caches_history(tiny):
    """bf16 numbers depend on which records share a batch: a bf16 pass is always over its whole set, so scoring
    set B after set A gives exactly what scoring B first gives; float32 reuses records across sets."""
    import numpy as np

    from memlens.data.synthetic import generate

    seqs = tiny.encode([r.text for r in generate(60, seed=3)])
    a, b = seqs[:20], seqs[10:60]
    for precision in ("bfloat16", "float32"):
        cfg = AuditConfig(precision=precision, batch_size=16)
        calls = []
        real = A.score

        def counting(model, s, **kw):
            calls.append(len(s))
            return real(model, s, **kw)

        A.score = counting
        try:
            A.cached_score(tiny, tiny.model, a, cfg, tiny.pad_id, identity=f"hist-{precision}-1")
            after_a = A.cached_score(tiny, tiny.model, b, cfg, tiny.pad_id, identity=f"hist-{precision}-1")
            fresh = A.cached_score(tiny, tiny.model, b, cfg, tiny.pad_id, identity=f"hist-{precision}-2")
            again = A.cached_score(tiny, tiny.model, b, cfg, tiny.pad_id, identity=f"hist-{precision}-1")
        finally:
            A.score = real
        if precision == "bfloat16":
            assert calls == [20, 50, 50]  # B scored whole, never patched from A's batches; then from the cache
            assert np.array_equal(after_a.sum_nll, fresh.sum_nll) and np.array_equal(again.sum_nll, fresh.sum_nll)
        else:
            assert calls == [20, 40, 50]  # the 10 records of A are reused ...
            assert np.allclose(after_a.mean_nll, fresh.mean_nll, atol=1e-5)  # ... and agree to 1e-5
