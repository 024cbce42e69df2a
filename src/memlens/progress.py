"""One progress bar per long loop (rich), or nothing when disabled."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, unit: str = "seq") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows done/total, rate and time left when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = [TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.update(task, advance=n)
