"""Records and the line-oriented readers (JSONL, CSV) every corpus is read through.

Every problem in an input file is reported as ``FILE:LINE: message`` in one :class:`MemlensError`, raised before
anything is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from memlens.errors import MemlensError


@dataclass(frozen=True)
class Span:
    """One annotated argument of an event: its role (e.g. ``treatment.drug``), text and character offset."""

    role: str
    text: str
    start: int


@dataclass(frozen=True)
class Event:
    event_type: str
    spans: tuple[Span, ...] = ()


@dataclass(frozen=True)
class Record:
    """One text of a corpus. ``fields`` maps an annotated field (``drug``, ``age`` ...) to its values."""

    id: str
    text: str
    split: str = "all"
    events: tuple[Event, ...] = ()
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)

    @property
    def text_hash(self) -> str:
        return text_hash(self.text)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MAX_LINE_BYTES = 1 << 20  # 1 MiB: a text longer than this is not a sentence (and would take minutes to tokenize)


def iter_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a UTF-8 file (a leading byte-order mark is dropped), naming the line of any
    invalid byte or of a line over :data:`MAX_LINE_BYTES`."""
    if not path.is_file():
        raise MemlensError(f"{path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise MemlensError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # the UTF-8 byte-order mark some editors and spreadsheet programs write
            if len(raw) > MAX_LINE_BYTES:
                raise MemlensError(f"{path}:{lineno}: line of {len(raw):,} bytes (at most {MAX_LINE_BYTES:,}: "
                                   "records are sentences or short passages)")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MemlensError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file."""
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemlensError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise MemlensError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def require_text(obj: dict[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise MemlensError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise MemlensError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise MemlensError(f"{where}: field {key!r} is empty")
    return value


def _optional_id(obj: dict[str, Any], where: str, default: str) -> str:
    if "id" not in obj or obj["id"] is None:
        return default
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise MemlensError(f"{where}: field 'id' must be a string or an integer, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise MemlensError(f"{where}: field 'id' is empty")
    return value


class _IdRegistry:
    """Remembers where each id was first seen, to name both lines of a duplicate."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def add(self, rid: str, where: str) -> None:
        if rid in self.seen:
            raise MemlensError(f"{where}: duplicate id {rid!r} (first seen at {self.seen[rid]})")
        self.seen[rid] = where


def read_jsonl(path: str | Path, split: str = "all") -> list[Record]:
    """Read a JSON Lines file with a ``text`` field and an optional ``id`` (default: ``line-N``)."""
    path = Path(path)
    ids = _IdRegistry()
    records = []
    for lineno, obj in iter_json_lines(path):
        where = f"{path}:{lineno}"
        text = require_text(obj, "text", where)
        rid = _optional_id(obj, where, f"line-{lineno}")
        ids.add(rid, where)
        records.append(Record(id=rid, text=text, split=split))
    if not records:
        raise MemlensError(f"{path}: no records")
    return records


def read_csv(path: str | Path, split: str = "all") -> list[Record]:
    """Read a CSV file with a header naming a ``text`` column and an optional ``id`` column."""
    path = Path(path)
    lines = [line for _, line in iter_text_lines(path)]  # decodes strictly, naming the bad line
    reader = csv.DictReader(io.StringIO("".join(lines), newline=""))
    if reader.fieldnames is None:
        raise MemlensError(f"{path}: empty file (expected a header with a 'text' column)")
    if "text" not in reader.fieldnames:
        raise MemlensError(f"{path}:1: missing column 'text' (header has {', '.join(reader.fieldnames)})")
    ids = _IdRegistry()
    records = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise MemlensError(f"{where}: more values than header columns")
            if any(v is None for v in row.values()):
                raise MemlensError(f"{where}: fewer values than header columns")
            text = require_text(row, "text", where)
            rid = _optional_id({"id": row.get("id") or None}, where, f"line-{reader.line_num}")
            ids.add(rid, where)
            records.append(Record(id=rid, text=text, split=split))
    except csv.Error as e:
        raise MemlensError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if not records:
        raise MemlensError(f"{path}: no records")
    return records
