"""PHEE (Sun et al., EMNLP 2022): pharmacovigilance sentences with annotated events.

The raw JSON Lines splits are read as they are published (one sentence per line: ``id``, ``context``,
``is_mult_event``, ``annotations``). Sources, in order: a folder the user names, ``$MEMLENS_PHEE_DIR``, the local
cache, and (only when asked) a download of the pinned upstream commit with sha256 checks.
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from memlens.data.records import Event, Record, Span, _IdRegistry, file_sha256, iter_json_lines, require_text
from memlens.errors import MemlensError
from memlens.paths import cache_dir

SPLITS = ("train", "dev", "test")
UPSTREAM_COMMIT = "41489b08675d0b63a1eb7cd4f2d1946952833eb1"
UPSTREAM_URL = "https://raw.githubusercontent.com/ZhaoyueSun/PHEE/{commit}/data/json/{split}.json"
SHA256 = {
    "train": "a2d6cbdae3d95cb3a7e13439164c002041061f6f9823608af483c82d17a31f2b",
    "dev": "e1e24c0dfbe6f624e590a26d294f3082d0142ffc28b9da56761f1dd45e96aa53",
    "test": "ca7e24a88f62e8201583e14f206cd4df5c543acc627abd195bea4df8acd9afdf",
}
# Argument roles of a PHEE event; sub-arguments of Subject and Treatment are named "subject.age", "treatment.drug".
_TOP_ROLES = ("Trigger", "Subject", "Treatment", "Effect", "Severity", "Speculated", "Negated")
_SUB_ROLES = {
    "Subject": ("Age", "Gender", "Race", "Population", "Disorder"),
    "Treatment": ("Drug", "Dosage", "Route", "Freq", "Duration", "Time_elapsed", "Disorder"),
}


def _spans(arg: dict[str, Any], role: str, context: str, where: str) -> list[Span]:
    texts, starts = arg.get("text"), arg.get("start")
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        raise MemlensError(f"{where}: annotation {role!r} needs lists 'text' and 'start' of equal length")
    spans = []
    for mention_texts, mention_starts in zip(texts, starts):
        if not isinstance(mention_texts, list) or not isinstance(mention_starts, list):
            raise MemlensError(f"{where}: annotation {role!r}: 'text' and 'start' must be lists of lists")
        for t, s in zip(mention_texts, mention_starts):
            if not isinstance(t, str) or not isinstance(s, int):
                raise MemlensError(f"{where}: annotation {role!r}: bad text/start pair {t!r}/{s!r}")
            if context[s : s + len(t)] != t:
                raise MemlensError(f"{where}: annotation {role!r}: {t!r} is not at offset {s} of the context")
            spans.append(Span(role=role, text=t, start=s))
    return spans


def _parse_events(annotations: Any, context: str, where: str) -> tuple[Event, ...]:
    if not isinstance(annotations, list):
        raise MemlensError(f"{where}: field 'annotations' must be a list")
    events = []
    for ann in annotations:
        if not isinstance(ann, dict) or not isinstance(ann.get("events"), list):
            raise MemlensError(f"{where}: each annotation needs a list 'events'")
        for ev in ann["events"]:
            if not isinstance(ev, dict) or not isinstance(ev.get("event_type"), str):
                raise MemlensError(f"{where}: each event needs a string 'event_type'")
            spans: list[Span] = []
            for top in _TOP_ROLES:
                if isinstance(ev.get(top), dict):
                    spans += _spans(ev[top], top.lower(), context, where)
                    for sub in _SUB_ROLES.get(top, ()):
                        if isinstance(ev[top].get(sub), dict):
                            spans += _spans(ev[top][sub], f"{top.lower()}.{sub.lower()}", context, where)
            events.append(Event(event_type=ev["event_type"], spans=tuple(spans)))
    return tuple(events)


def fields_of(events: tuple[Event, ...]) -> dict[str, tuple[str, ...]]:
    """The annotated values per role, in order of appearance, without repeats."""
    out: dict[str, list[str]] = {}
    for ev in events:
        for sp in ev.spans:
            vals = out.setdefault(sp.role, [])
            if sp.text not in vals:
                vals.append(sp.text)
    return {k: tuple(v) for k, v in out.items()}


def is_phee_form(path: str | Path) -> bool:
    """Whether a JSON Lines file is in PHEE's annotated form (``context`` and ``annotations`` on its first line)
    rather than plain ``text`` lines; the first line decides, and :func:`read_split` checks every line."""
    for _, obj in iter_json_lines(Path(path)):
        return "context" in obj and "annotations" in obj and "text" not in obj
    return False


def read_jsonl_any(path: str | Path, split: str = "all") -> list[Record]:
    """A JSON Lines file of plain texts (``text``, optional ``id``) or in PHEE's annotated form (``id``,
    ``context``, ``annotations``: the field games then have fields to play)."""
    from memlens.data.records import read_jsonl

    return read_split(path, split) if is_phee_form(path) else read_jsonl(path, split)


def read_split(path: str | Path, split: str) -> list[Record]:
    """Read one PHEE split file; any problem is reported as ``FILE:LINE: message``."""
    path = Path(path)
    ids = _IdRegistry()
    records = []
    for lineno, obj in iter_json_lines(path):
        where = f"{path}:{lineno}"
        context = require_text(obj, "context", where)
        rid = require_text(obj, "id", where)
        if "annotations" not in obj:
            raise MemlensError(f"{where}: missing field 'annotations'")
        events = _parse_events(obj["annotations"], context, where)
        ids.add(rid, where)
        records.append(Record(id=rid, text=context, split=split, events=events, fields=fields_of(events)))
    if not records:
        raise MemlensError(f"{path}: no records")
    return records


def locate(path: str | Path | None = None, allow_download: bool = False) -> Path:
    """Find the folder holding train.json, dev.json and test.json (see the module docstring for the order)."""
    candidates: list[tuple[str, Path]] = []
    if path is not None:
        folder = Path(path).expanduser()
        missing = [s for s in SPLITS if not (folder / f"{s}.json").is_file()]
        if missing:
            raise MemlensError(f"{folder}: not a PHEE folder (missing {', '.join(s + '.json' for s in missing)})")
        return folder
    if os.environ.get("MEMLENS_PHEE_DIR"):
        candidates.append(("$MEMLENS_PHEE_DIR", Path(os.environ["MEMLENS_PHEE_DIR"]).expanduser()))
    candidates.append(("cache", cache_dir() / "phee" / UPSTREAM_COMMIT))
    for _, folder in candidates:
        if all((folder / f"{s}.json").is_file() for s in SPLITS):
            return folder
    if allow_download:
        return download()
    raise MemlensError(
        "PHEE not found: set data.path to the folder holding train.json, dev.json and test.json, "
        "set $MEMLENS_PHEE_DIR, or allow a download with data.allow_download=true"
    )


def download(dest: Path | None = None) -> Path:
    """Fetch the pinned upstream splits into the cache, checking each file's sha256 before it is kept."""
    dest = dest or cache_dir() / "phee" / UPSTREAM_COMMIT
    dest.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        target = dest / f"{split}.json"
        if target.is_file() and file_sha256(target) == SHA256[split]:
            continue
        url = UPSTREAM_URL.format(commit=UPSTREAM_COMMIT, split=split)
        with tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (fixed https URL)
                    tmp.write(resp.read())
            except OSError as e:
                os.unlink(tmp.name)
                raise MemlensError(f"PHEE download of {url} failed: {e}") from None
        digest = file_sha256(Path(tmp.name))
        if digest != SHA256[split]:
            os.unlink(tmp.name)
            raise MemlensError(f"PHEE {split}.json from {url}: sha256 {digest} does not match {SHA256[split]}")
        os.replace(tmp.name, target)
    return dest


def load(path: str | Path | None = None, allow_download: bool = False) -> dict[str, list[Record]]:
    """Read the three PHEE splits: ``{"train": [...], "dev": [...], "test": [...]}``."""
    folder = locate(path, allow_download)
    return {s: read_split(folder / f"{s}.json", s) for s in SPLITS}
