"""Progress of long loops: one rich bar per loop, or nothing when disabled.

In a study's worker process (memlens.study) there is no terminal of its own: :func:`forward_to` sends each loop's
progress as small events to the study's process instead, which shows the run's current loop under the study's bar.
Events, each a tuple:

- ``("start", description, total, completed, unit)`` when a loop begins;
- ``("update", completed, fields)`` as it advances, at most every :data:`FORWARD_EVERY_S` seconds (``fields``: the
  loop's own figures as text, e.g. ``{"loss": "3.1042"}``);
- ``("end", description, completed, total, unit, seconds)`` when it ends, finished or not.

:class:`LoopLines` is the receiving end.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

FORWARD_EVERY_S = 1.0
LOGGED_S = 60.0  # a forwarded loop that took this long gets a log line (what a study's log file keeps of it)

log = logging.getLogger(__name__)

_sink: Callable[[tuple], None] | None = None


def forward_to(sink: Callable[[tuple], None] | None) -> None:
    """Send every enabled loop's progress to ``sink`` (e.g. a multiprocessing queue's ``put``) instead of drawing it;
    None draws again."""
    global _sink
    _sink = sink


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, unit: str = "seq", *, completed: int = 0,
                 fields: dict[str, str] | None = None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; shows done/total, the ``fields`` (name and value, updated by ``advance``),
    rate and time left when enabled. ``completed``: the part done before (a training going on from a saved state)."""
    if not enabled:
        yield lambda n=1, **_: None
        return
    if _sink is not None:
        with _forwarded(_sink, description, total, unit, completed, dict(fields or {})) as advance:
            yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    shown = [TextColumn(f"{name} {{task.fields[{name}]}}", markup=False) for name in fields or {}]
    columns = [TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), *shown,
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as p:
        task = p.add_task(description, total=total, completed=completed, **(fields or {}))
        yield lambda n=1, **f: p.update(task, advance=n, **f)


@contextmanager
def _forwarded(sink: Callable[[tuple], None], description: str, total: int, unit: str, completed: int,
               fields: dict[str, str]) -> Iterator[Callable[..., None]]:
    def send(event: tuple) -> None:  # showing progress must never stop the loop or hide its own error
        try:
            sink(event)
        except Exception:  # noqa: BLE001
            pass

    done, t0 = completed, time.monotonic()
    sent = t0
    send(("start", description, total, completed, unit))

    def advance(n: int = 1, **f: str) -> None:
        nonlocal done, sent
        done += n
        fields.update(f)
        now = time.monotonic()
        if now - sent >= FORWARD_EVERY_S:
            sent = now
            send(("update", done, dict(fields)))

    try:
        yield advance
    finally:
        send(("update", done, dict(fields)))
        send(("end", description, done, total, unit, time.monotonic() - t0))


def study_progress(enabled: bool = True, console: Any = None) -> Any:
    """The rich Progress of a study: its own line (description ``study NAME``, ``current``: the run in progress) and
    those of its runs' loops (:class:`LoopLines`); descriptions and figures are shown as written, never as markup."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[current]}", markup=False), TimeElapsedColumn(), TextColumn("left"),
                    TimeRemainingColumn(), disable=not enabled, console=console)


class LoopLines:
    """A worker's loops, from its events, as lines of a rich Progress below the study's own (a loop inside another,
    such as a reference adapter's training inside the references' loop, one line further down), and a log line
    ``PREFIX: DESCRIPTION DONE of TOTAL UNIT in SECONDS s`` for each that took at least :data:`LOGGED_S` (``(from N)``
    after the unit where the loop went on from N done before, the seconds being this try's). The Progress shows
    ``{task.description}`` and ``{task.fields[current]}`` (the loop's unit and figures), both without markup."""

    def __init__(self, bar: Any, prefix: str) -> None:
        self.bar, self.prefix = bar, prefix
        self.open: list[tuple[Any, str, int]] = []  # (task, unit, done at the start), innermost last

    def __call__(self, event: tuple) -> None:
        kind = event[0]
        if kind == "start":
            _, description, total, completed, unit = event
            indent = "  " * (len(self.open) + 1)
            self.open.append((self.bar.add_task(indent + description, total=total, completed=completed,
                                                current=unit), unit, completed))
        elif kind == "update" and self.open:
            _, completed, fields = event
            task, unit, _ = self.open[-1]
            shown = " ".join([unit, *(f"{k} {v}" for k, v in fields.items())])
            self.bar.update(task, completed=completed, current=shown)
        elif kind == "end":
            _, description, completed, total, unit, seconds = event
            head = 0
            if self.open:
                task, _, head = self.open.pop()
                self.bar.remove_task(task)
            if seconds >= LOGGED_S:
                went_on = f" (from {head})" if head else ""
                log.info("%s: %s %d of %d %s%s in %.0f s", self.prefix, description, completed, total, unit, went_on,
                         seconds)

    def close(self) -> None:
        """Take away the lines of loops that never said they ended (a worker that died)."""
        while self.open:
            self.bar.remove_task(self.open.pop()[0])
