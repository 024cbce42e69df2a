"""The results store: one SQLite file (embedded, no server).

Tables
------
runs         one row per run: resolved config and its hash, data manifest hash, versions, seed, timings, summary
samples      per run and record: id, member flag, text hash, canary copies, raw text only when asked
values       per run and record, long format: name (nll_base, nll_ft, ppl_ft, min_k_0.2_ft, score_ref_ratio ...)
             and value
generations  per run, record, decoding and sample: prefix/suffix lengths, similarity measures, generated-text
             perplexity (and the generated text only when asked)
metrics      per run: name (auc, tpr@0.01 ...), subject (an attack or a measure), value, interval, details (JSON)
checkpoints  per run and checkpoint during training (audit.checkpoints): step, epoch, name (heldout_nll, auc ...),
             subject (an attack, or empty), value, interval
meta         the store's own settings: its secret key for text hashes

Text hashes are keyed: ``samples.text_hash`` is HMAC-SHA256 of the text's SHA-256 under a random key made with the
store and kept in it (never exported), so a reader of an export cannot hash a guessed sentence and look it up.

A run is written in one transaction: an interrupted write leaves no rows of it.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from memlens.errors import MemlensError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT, study TEXT, created REAL, config_json TEXT, config_hash TEXT,
    manifest_hash TEXT, versions_json TEXT, seed INTEGER, timings_json TEXT, summary_json TEXT
);
CREATE TABLE IF NOT EXISTS samples (
    run_id TEXT, sample_id TEXT, member INTEGER, text_hash TEXT, canary_copies INTEGER, text TEXT,
    PRIMARY KEY (run_id, sample_id)
);
CREATE TABLE IF NOT EXISTS "values" (
    run_id TEXT, sample_id TEXT, name TEXT, value REAL, PRIMARY KEY (run_id, sample_id, name)
);
CREATE TABLE IF NOT EXISTS generations (
    run_id TEXT, sample_id TEXT, member INTEGER, decoding TEXT, sample INTEGER, prefix_len INTEGER,
    suffix_len INTEGER, ngram_share REAL, exact REAL, prefix_match REAL, rouge_l REAL, edit_sim REAL,
    gen_ppl REAL, text TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT, name TEXT, subject TEXT, value REAL, lo REAL, hi REAL, details_json TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT, step INTEGER, epoch REAL, name TEXT, subject TEXT, value REAL, lo REAL, hi REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE INDEX IF NOT EXISTS values_run ON "values" (run_id);
CREATE INDEX IF NOT EXISTS generations_run ON generations (run_id);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics (run_id);
"""
_TABLES = ("runs", "samples", '"values"', "generations", "metrics", "checkpoints")


_COLUMNS = {"runs": {"run_id", "config_json", "summary_json"}, "samples": {"run_id", "sample_id", "member"},
            "values": {"run_id", "sample_id", "name", "value"}, "generations": {"run_id", "sample_id", "decoding"},
            "metrics": {"run_id", "name", "subject", "value"}}


def _check_memlens_store(conn: sqlite3.Connection, path: Path, empty_ok: bool) -> None:
    """Refuse a SQLite file that holds tables other than a memlens store's (another program's database)."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        conn.close()
        raise MemlensError(f"{path}: not a memlens results store ({e})") from None
    if not tables and empty_ok:
        return
    for t, cols in _COLUMNS.items():
        have = {r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')} if t in tables else set()
        if not cols <= have:
            conn.close()
            raise MemlensError(f"{path}: not a memlens results store (no table {t!r} with columns "
                               f"{', '.join(sorted(cols))}); memlens leaves it untouched")


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (or create) a store for writing; a SQLite file that is not a memlens store is refused, unchanged."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MemlensError(f"{path}: not a file (a results store is one SQLite file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        new = not path.exists()
        if new:  # user-only from its first byte: the store may hold raw text (audit.include_text)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(path, timeout=60)
        _check_memlens_store(conn, path, empty_ok=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        _text_key(conn)
    except sqlite3.Error as e:
        raise MemlensError(f"{path}: cannot open the results store ({e})") from None
    except OSError as e:
        raise MemlensError(f"{path}: cannot create the results store ({e.strerror})") from None
    return conn


def _keyed(key: str, text_hash: str | None) -> str | None:
    return None if text_hash is None else hmac.new(bytes.fromhex(key), text_hash.encode(), hashlib.sha256).hexdigest()


def _text_key(conn: sqlite3.Connection) -> str:
    """The store's secret key for text hashes; made on first use. A store written before keys existed has its
    plain hashes replaced by keyed ones then, in one transaction."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'text_key'").fetchone()
    if row:
        return row[0]
    key = secrets.token_hex(32)
    with transaction(conn):
        conn.execute("INSERT INTO meta VALUES ('text_key', ?)", (key,))
        rows = conn.execute("SELECT rowid, text_hash FROM samples").fetchall()
        conn.executemany("UPDATE samples SET text_hash = ? WHERE rowid = ?", [(_keyed(key, h), r) for r, h in rows])
    return key


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """Open a store for reading only: nothing is created or changed, and a file that is not a store is refused."""
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"{path}: no results store")
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise MemlensError(f"{path}: cannot open the results store ({e})") from None
    _check_memlens_store(conn, path, empty_ok=False)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN ... COMMIT, or ROLLBACK on any error (or nothing at all if the process dies)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def run_exists(conn: sqlite3.Connection, run_id: str) -> bool:
    return conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    """Stores written before a table existed lack it until opened for writing."""
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return row is not None


def delete_run(conn: sqlite3.Connection, run_id: str) -> None:
    for t in _TABLES:
        conn.execute(f"DELETE FROM {t} WHERE run_id = ?", (run_id,))


def write_run(conn: sqlite3.Connection, run: dict[str, Any], samples: list[tuple], values: Iterable[tuple],
              generations: Iterable[tuple], metrics: Iterable[tuple], replace: bool = False,
              checkpoints: Iterable[tuple] = ()) -> None:
    """Write one run and all its rows in a single transaction.

    ``samples``: (sample_id, member, text_hash, canary_copies, text_or_None); ``values``: (sample_id, name, value);
    ``generations``: tuples in the column order of the table after run_id; ``metrics``: (name, subject, value, lo,
    hi, details_dict); ``checkpoints``: (step, epoch, name, subject, value, lo, hi).
    """
    key = _text_key(conn)
    with transaction(conn):
        if run_exists(conn, run["run_id"]):
            if not replace:
                raise MemlensError(f"run {run['run_id']} is already in the store (pass --overwrite to replace it)")
            delete_run(conn, run["run_id"])
        conn.execute(
            "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (run["run_id"], run.get("name"), run.get("study"), time.time(), json.dumps(run["config"]),
             run["config_hash"], run["manifest_hash"], json.dumps(run["versions"]), run["seed"],
             json.dumps(run["timings"]), json.dumps(run.get("summary", {}))),
        )
        rid = run["run_id"]
        conn.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?)",
                         [(rid, sid, m, _keyed(key, th), *rest) for sid, m, th, *rest in samples])
        conn.executemany('INSERT INTO "values" VALUES (?,?,?,?)', ((rid, *v) for v in values))
        conn.executemany("INSERT INTO generations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         ((rid, *g) for g in generations))
        conn.executemany("INSERT INTO metrics VALUES (?,?,?,?,?,?,?)",
                         ((rid, n, s, v, lo, hi, json.dumps(d)) for n, s, v, lo, hi, d in metrics))
        conn.executemany("INSERT INTO checkpoints VALUES (?,?,?,?,?,?,?,?)", ((rid, *c) for c in checkpoints))


def list_runs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT run_id, name, study, created, config_hash, manifest_hash, seed, summary_json FROM runs "
                        "ORDER BY created").fetchall()
    keys = ("run_id", "name", "study", "created", "config_hash", "manifest_hash", "seed", "summary")
    return [dict(zip(keys, r[:-1] + (json.loads(r[-1]),))) for r in rows]


def resolve_run(conn: sqlite3.Connection, ref: str) -> str:
    """A run id from its id, a unique prefix of it, or its name."""
    rows = conn.execute("SELECT run_id FROM runs WHERE run_id = ? OR name = ? OR run_id LIKE ?",
                        (ref, ref, ref + "%")).fetchall()
    ids = sorted({r[0] for r in rows})
    if not ids:
        raise MemlensError(f"no run {ref!r} in the store")
    if len(ids) > 1:
        raise MemlensError(f"{ref!r} matches {len(ids)} runs: {', '.join(i[:12] for i in ids)}")
    return ids[0]


def get_run(conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
    r = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    cols = [d[0] for d in conn.execute("SELECT * FROM runs LIMIT 0").description]
    out = dict(zip(cols, r))
    for k in ("config_json", "versions_json", "timings_json", "summary_json"):
        out[k.removesuffix("_json")] = json.loads(out.pop(k))
    out["metrics"] = [
        {"name": n, "subject": s, "value": v, "lo": lo, "hi": hi, "details": json.loads(d)}
        for n, s, v, lo, hi, d in conn.execute(
            "SELECT name, subject, value, lo, hi, details_json FROM metrics WHERE run_id = ? ORDER BY rowid", (run_id,))
    ]
    return out


def checkpoint_table(conn: sqlite3.Connection, run_id: str) -> tuple[list[str], list[list[Any]]]:
    """The run's trajectory (audit.checkpoints), one row per checkpoint and measure; empty without one."""
    header = ["step", "epoch", "name", "subject", "value", "lo", "hi"]
    if not _has_table(conn, "checkpoints"):
        return header, []
    rows = conn.execute("SELECT step, epoch, name, subject, value, lo, hi FROM checkpoints WHERE run_id = ? "
                        "ORDER BY step, rowid", (run_id,)).fetchall()
    return header, [list(r) for r in rows]


def field_table(conn: sqlite3.Connection, run_id: str) -> tuple[list[str], list[list[Any]]]:
    """The run's field-leakage rows (audit.fields): one per game measure and field type, rates and differences
    (no text: field values never leave the store)."""
    keys = ["n_members", "n_nonmembers", "repeats", "members", "nonmembers", "members_base", "nonmembers_base",
            "member_minus_nonmember", "mn_lo", "mn_hi", "mn_by", "ft_minus_base", "fb_lo", "fb_hi", "fb_by",
            "gain_minus_gain", "gg_lo", "gg_hi", "gg_by", "chance", "n_canaries", "canaries", "canaries_base", "canary_minus_nonmember", "cn_lo", "cn_hi", "cn_by"]
    rows = []
    for name, subject, details in conn.execute("SELECT name, subject, details_json FROM metrics WHERE run_id = ? "
                                               "AND name LIKE 'field:%' ORDER BY rowid", (run_id,)):
        d = json.loads(details)
        rows.append([name.removeprefix("field:"), subject, *(d.get(k) for k in keys)])
    return ["measure", "field", *keys], rows


def sample_table(conn: sqlite3.Connection, run_id: str) -> tuple[list[str], list[list[Any]]]:
    """The run's per-sample table: id, member, canary copies, then one column per value name (no text hash, keyed
    or not: an export never carries anything computed from a text)."""
    names = [r[0] for r in conn.execute('SELECT DISTINCT name FROM "values" WHERE run_id = ? ORDER BY name',
                                        (run_id,))]
    front = ["n_tokens", "nll_base", "nll_ft"]
    names = [n for n in front if n in names] + [n for n in names if n not in front]
    samples = conn.execute("SELECT sample_id, member, canary_copies FROM samples WHERE run_id = ? "
                           "ORDER BY rowid", (run_id,)).fetchall()
    vals: dict[tuple[str, str], float] = {
        (s, n): v for s, n, v in conn.execute('SELECT sample_id, name, value FROM "values" WHERE run_id = ?', (run_id,))
    }
    header = ["id", "member", "canary_copies", *names]
    rows = [[sid, member, cc, *(vals.get((sid, n)) for n in names)] for sid, member, cc in samples]
    return header, rows


def export(conn: sqlite3.Connection, run_id: str, fmt: str, out: str | Path, table: str = "samples") -> Path | None:
    """Write the per-sample table (``table="samples"``), the trajectory (``"checkpoints"``) or the field-leakage
    rows (``"fields"``) to CSV or Parquet;
    ``out`` = ``-`` writes CSV to standard output.

    The file is written under a temporary name beside ``out`` (user-only), then renamed onto it; an existing ``out``
    is replaced only when it is a regular file (a folder, a symbolic link or a device is refused, untouched).
    """
    import os
    import sys
    import tempfile

    if fmt not in ("csv", "parquet"):
        raise MemlensError(f"unknown export format {fmt!r}: expected csv or parquet")
    tables = {"samples": sample_table, "checkpoints": checkpoint_table, "fields": field_table}
    if table not in tables:
        raise MemlensError(f"unknown table {table!r}: expected {', '.join(tables)}")
    if table != "samples" and not tables[table](conn, run_id)[1]:
        setting = {"checkpoints": "audit.checkpoints", "fields": "audit.fields"}[table]
        raise MemlensError(f"run {run_id[:12]} has no {table} rows (it ran without {setting})")
    if str(out) == "-":
        if fmt != "csv":
            raise MemlensError("--out -: only CSV can be written to standard output")
        header, rows = tables[table](conn, run_id)
        w = csv.writer(sys.stdout)
        w.writerow(header)
        w.writerows(rows)
        return None
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        kind = "a symbolic link" if out.is_symlink() else "a folder" if out.is_dir() else "not a regular file"
        raise MemlensError(f"{out}: {kind}; memlens replaces only a regular file (choose a file path, or - for "
                           "standard output)")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MemlensError("Parquet export needs pyarrow: pip install 'memlens[parquet]'") from None
    header, rows = tables[table](conn, run_id)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as e:
        raise MemlensError(f"{out}: cannot write there ({e.strerror})") from None
    try:
        if fmt == "csv":
            with os.fdopen(fd, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
        else:
            os.close(fd)
            cols = {h: [r[i] for r in rows] for i, h in enumerate(header)}
            pq.write_table(pa.table(cols), tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
