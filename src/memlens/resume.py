"""What resuming a study could get silently wrong, checked before any work.

A study's runs are known by their run ids, the hash of each resolved config (memlens.study); a resume skips the runs
already in the store. Two things would go wrong without a word:

- a planned run already in the store was made on other data than its settings give now (the data manifest, which
  hashes the files and the drawn split, differs): the study would mix two data sets;
- the same data are named by another path (``data.path=../shared/data/phee`` for ``/work/shared/data/phee``, or the
  path inside ``data.source=jsonl:PATH``): the path as written is part of the run id, so the study would start over.

Both are refused with one line that names the run or the field and both spellings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from memlens.config import DataConfig, RunConfig
from memlens.errors import MemlensError
from memlens.provenance import json_hash

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Stored:
    run_id: str
    study: str | None
    config: Any
    manifest: str | None


class _DataUnreadable(Exception):
    pass


class _Manifests:
    """The manifest hash of each data config, each corpus read once."""

    def __init__(self) -> None:
        self.corpora: dict[str, Any] = {}
        self.hashes: dict[str, str] = {}

    def __call__(self, data: DataConfig, source: str | None = None) -> str:
        """``source``: as if the source were written so (a JSONL or CSV corpus's manifest names it)."""
        from memlens.data import load_corpus, make_split

        key = data.model_dump_json() + str(source)
        if key not in self.hashes:
            where = json.dumps([data.source, data.path, data.allow_download, data.synthetic_size])
            try:
                if where not in self.corpora:
                    self.corpora[where] = load_corpus(data)
                corpus = self.corpora[where]
                if source is not None:
                    corpus = dataclasses.replace(corpus, source=source)
                splits_log = logging.getLogger("memlens.data.splits")
                level = splits_log.level
                splits_log.setLevel(logging.ERROR)  # the run itself warns of overlaps, once
                try:
                    self.hashes[key] = make_split(corpus, data).manifest["hash"]
                finally:
                    splits_log.setLevel(level)
            except MemlensError as e:
                raise _DataUnreadable(str(e)) from None
        return self.hashes[key]


def check_resume(study: str, runs: list[Any], db: Path, *, data_required: bool = True) -> None:
    """Refuse (MemlensError) a resume of ``runs`` (memlens.study.PlannedRun) on the store ``db`` that would mix data
    or redo the study under another spelling of its data's path. With ``data_required`` false (a dry run, which may
    look at a store on a machine without the data), data that cannot be read give a warning instead."""
    stored = _stored_runs(db)
    if not stored:
        return
    try:
        problem = _changed_data(study, runs, stored, _Manifests())
    except _DataUnreadable as e:
        if data_required:
            raise MemlensError(f"store {db}: cannot check its runs of study {study} against the data: {e}") from None
        log.warning("store %s: its runs were not checked against the data, which cannot be read here: %s", db, e)
        return
    if problem is not None:
        raise MemlensError(f"store {db}: {problem}")


def _changed_data(study: str, runs: list[Any], stored: list[_Stored], manifest: _Manifests) -> str | None:
    by_id = {r.run_id: r for r in runs}
    for s in stored:
        r = by_id.get(s.run_id)
        if r is not None and s.manifest != manifest(r.config.data):
            field, where, _ = _where_data_lives(r.config.data.model_dump(mode="json"))
            return (f"run {r.config.name} of study {study} is there, made on other data than {field} {where} gives "
                    "now (its data manifest differs: the files changed, or a memlens whose manifests differed wrote "
                    "it); resuming would mix two data sets in one study: give another --store, or restore the data")
    if any(s.run_id in by_id for s in stored):
        return None  # resuming: runs spelt otherwise (if any) were an earlier mistake, not these runs
    todo: dict[str, list[Any]] = {}
    for r in runs:
        todo.setdefault(_without_location(r.config.hashed()), []).append(r)
    for s in stored:
        d = _stored_hashed(s.config) if s.study == study else None
        if d is None:
            continue
        for r in todo.get(_without_location(d), []):
            if s.manifest != manifest(r.config.data, d["data"]["source"]):
                continue  # other data: other runs
            field, was, ask = _where_data_lives(d["data"])
            _, now, _ = _where_data_lives(r.config.data.model_dump(mode="json"))
            if field == "data.path" and d["data"]["path"] is not None and not Path(d["data"]["path"]).is_absolute():
                ask += " (relative to the folder the study ran in)"
            return (f"its runs of study {study} were made with {field} {was}, the same data as {field} {now} here, "
                    f"but the path as written is part of the run id: this command would do them again; resume with "
                    f"{ask} (or give another --store)")
    return None


def _stored_runs(db: Path) -> list[_Stored]:
    from memlens import store as S

    if not db.is_file():
        return []
    conn = S.connect_readonly(db)
    try:
        rows = conn.execute("SELECT run_id, study, config_json, manifest_hash FROM runs").fetchall()
    finally:
        conn.close()
    out = []
    for rid, study, cfg, manifest in rows:
        try:
            out.append(_Stored(rid, study, json.loads(cfg), manifest))
        except (TypeError, ValueError):  # not a config memlens wrote: it cannot be one of these runs
            continue
    return out


def _stored_hashed(cfg_json: Any) -> dict[str, Any] | None:
    """What a stored run's id was the hash of (its own resolution of ``auto`` kept); None where the stored config is
    not one this memlens reads (an older one's keys, no recorded resolution and a device this machine lacks)."""
    if not isinstance(cfg_json, dict):
        return None
    cfg_json = dict(cfg_json)
    resolved = cfg_json.pop("resolved", None)
    try:
        return RunConfig.model_validate(cfg_json).hashed(resolved if isinstance(resolved, dict) else None)
    except (ValueError, MemlensError):
        return None


def _where_data_lives(data: dict[str, Any]) -> tuple[str, str, str]:
    """Where a config's data (its data section) live, not what they are: (field, value, how to ask for it)."""
    source, path = data["source"], data.get("path")
    if ":" in source:
        return "data.source", source, f"data.source={source}"
    if path is None:
        return "data.path", "unset ($MEMLENS_PHEE_DIR or the cache)", "data.path left out"
    return "data.path", path, f"data.path={path}"


def _without_location(d: dict[str, Any]) -> str:
    """The hash of a hashed config with where its data live left out (what stays is what the data are and how the
    run uses them; the data themselves are compared by their manifest)."""
    data = dict(d["data"], path=None, source=d["data"]["source"].partition(":")[0])
    return json_hash({**d, "data": data})
