"""What a report reads from the store: runs with their settings, metrics, per-sample scores and generations."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memlens.errors import MemlensError


@dataclass
class RunView:
    run_id: str
    name: str
    study: str | None
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    # settings that define a configuration (everything but the seeds)
    @property
    def targets(self) -> str:
        if self.config.get("train", {}).get("method") == "full":
            return "full"
        return "+".join(t.upper() for t in self.config.get("lora", {}).get("targets", []))

    @property
    def rank(self) -> int | None:
        return self.config.get("lora", {}).get("rank")

    @property
    def alpha_rule(self) -> str:
        return self.config.get("lora", {}).get("alpha_rule", "fixed")

    @property
    def repeats(self) -> int:
        return self.config.get("data", {}).get("canary", {}).get("repeats", 1)

    @property
    def seeds(self) -> tuple[int, int]:
        return self.config.get("train", {}).get("seed", 0), self.config.get("data", {}).get("seed", 0)

    @property
    def trainable(self) -> int | None:
        return self.summary.get("trainable_total")

    def identity(self) -> dict[str, Any]:
        """A copy of the configuration as its run id sees it (memlens.config.identity: without name, output, store
        and the settings that change no result; settings added later at their defaults count as absent, so a run
        stored by an earlier memlens is a repeat of its configuration)."""
        from memlens.config import identity

        return identity(json.loads(json.dumps(self.config)))

    def settings_key(self, drop: tuple[str, ...]) -> str:
        """:meth:`identity` without the dotted keys in ``drop``."""
        cfg = self.identity()
        for dotted in drop:
            node = cfg
            *parents, last = dotted.split(".")
            for p in parents:
                node = node.get(p, {})
            node.pop(last, None)
        return json.dumps(cfg, sort_keys=True)

    @property
    def key(self) -> str:
        """The configuration without its seeds: runs with the same key are repeats of one configuration."""
        return self.settings_key(("train.seed", "data.seed"))

    def metric(self, name: str, subject: str) -> dict[str, Any] | None:
        for m in self.metrics:
            if m["name"] == name and m["subject"] == subject:
                return m
        return None

    def auc(self, attack: str) -> float:
        m = self.metric("auc", attack)
        return float("nan") if m is None or m["value"] is None else float(m["value"])


def load_runs(conn: sqlite3.Connection, study: str | None = None) -> list[RunView]:
    q = "SELECT run_id, name, study, config_json, summary_json FROM runs"
    args: tuple = ()
    if study is not None:
        q += " WHERE study = ?"
        args = (study,)
    runs = [RunView(r, n, s, json.loads(c), json.loads(sm)) for r, n, s, c, sm in conn.execute(q + " ORDER BY created",
                                                                                            args)]
    if not runs:
        raise MemlensError(f"no runs{' of study ' + study if study else ''} in the store")
    for rv in runs:
        rv.metrics = [{"name": n, "subject": s, "value": v, "lo": lo, "hi": hi, "details": json.loads(d)}
                      for n, s, v, lo, hi, d in conn.execute(
                          "SELECT name, subject, value, lo, hi, details_json FROM metrics WHERE run_id = ?",
                          (rv.run_id,))]
    return runs


def sample_scores(conn: sqlite3.Connection, run_id: str, names: list[str]) -> dict[str, Any]:
    """{"ids": [...], "member": array, name: array ...} for the run's records, in a stable order (by id)."""
    ids_members = conn.execute("SELECT sample_id, member FROM samples WHERE run_id = ? ORDER BY sample_id",
                               (run_id,)).fetchall()
    out: dict[str, Any] = {"ids": [i for i, _ in ids_members],
                           "member": np.array([m for _, m in ids_members], dtype=int)}
    pos = {i: k for k, (i, _) in enumerate(ids_members)}
    for name in names:
        arr = np.full(len(ids_members), np.nan)
        for sid, v in conn.execute('SELECT sample_id, value FROM "values" WHERE run_id = ? AND name = ?',
                                   (run_id, name)):
            arr[pos[sid]] = v
        out[name] = arr
    return out


def generations(conn: sqlite3.Connection, run_id: str) -> list[dict[str, Any]]:
    cols = ("sample_id", "member", "decoding", "sample", "prefix_len", "suffix_len", "ngram_share", "exact",
            "prefix_match", "rouge_l", "edit_sim", "gen_ppl", "text")
    rows = conn.execute(f"SELECT {', '.join(cols)} FROM generations WHERE run_id = ?", (run_id,)).fetchall()
    return [dict(zip(cols, r)) for r in rows]


def canary_ids(conn: sqlite3.Connection, run_id: str) -> set[str]:
    return {r[0] for r in conn.execute("SELECT sample_id FROM samples WHERE run_id = ? AND canary_copies > 1",
                                       (run_id,))}


def texts(conn: sqlite3.Connection, run_id: str) -> dict[str, str]:
    return {s: t for s, t in conn.execute("SELECT sample_id, text FROM samples WHERE run_id = ? AND text IS NOT NULL",
                                          (run_id,))}


def connect_readonly(path: Path) -> sqlite3.Connection:
    from memlens.store import connect_readonly as open_store

    return open_store(path)


def heldout_ppl_interval(conn: sqlite3.Connection, run_id: str, n_boot: int = 200, seed: int = 0
                         ) -> tuple[float, float] | None:
    """95% bootstrap interval (over non-member records) of the held-out perplexity under the fine-tuned model,
    token-weighted as the stored value is; None when the run's per-sample values are missing."""
    sc = sample_scores(conn, run_id, ["nll_ft", "n_tokens"])
    non = (sc["member"] == 0) & np.isfinite(sc["nll_ft"]) & np.isfinite(sc["n_tokens"])
    if non.sum() < 2:
        return None
    tok = sc["n_tokens"][non]
    tot = sc["nll_ft"][non] * tok
    idx = np.random.default_rng(seed).integers(0, len(tok), size=(n_boot, len(tok)))
    vals = np.exp(tot[idx].sum(axis=1) / tok[idx].sum(axis=1))
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)
