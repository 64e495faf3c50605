"""The `forklift` command's progress bars (rich): bytes of a transfer, a job's own progress.

Bars go to stderr, so stdout stays the command's output; they are drawn only when both are a
terminal (a redirected or piped command prints no bar), and rich sizes them to the
terminal's width. `Bars(enabled=False)` hands out bars that draw nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from forklift.npy_stream import ByteProgress


def terminal() -> bool:
    """Whether a bar may be drawn: stdout and stderr are both a terminal."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class JobBar:
    """One job's bar: its fraction, status, elapsed time and the job's note."""

    def __init__(self, progress: Progress | None, label: str) -> None:
        self._progress = progress
        self._task = (
            progress.add_task(label, total=1.0, status="queued", note="")
            if progress is not None
            else None
        )

    def update(self, status: str, progress: Mapping[str, Any] | None) -> None:
        if self._progress is None or self._task is None:
            return
        fraction = float((progress or {}).get("fraction") or 0.0)
        if status == "succeeded":
            fraction = 1.0
        note = str((progress or {}).get("note") or "")
        self._progress.update(
            self._task,
            completed=max(0.0, min(1.0, fraction)),
            status=status,
            note=note,
            refresh=True,
        )


class Bars:
    """Where the command's bars come from; off unless `enabled` and on a terminal."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled and (console is not None or terminal())
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def transfer(self, label: str, total: int | None = None) -> Iterator[ByteProgress]:
        """A bytes bar (done/total, rate, time left) for the block; yields the callback."""
        if not self.enabled:
            yield _ignore
            return
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=None),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True, expand=True) as progress:
            task = progress.add_task(label, total=total)

            def advance(done: int, total: int | None) -> None:
                # Redrawn at once: a chunk is megabytes, so this is a few hundred draws a GiB.
                if total is not None:
                    progress.update(task, completed=done, total=total, refresh=True)
                else:
                    progress.update(task, completed=done, refresh=True)

            yield advance

    @contextlib.contextmanager
    def job(self, label: str) -> Iterator[JobBar]:
        """A job's bar for the block (the fraction the job reports, its status and note)."""
        if not self.enabled:
            yield JobBar(None, label)
            return
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
        )
        with Progress(*columns, console=self.console, transient=True, expand=True) as progress:
            yield JobBar(progress, label)


def _ignore(done: int, total: int | None) -> None:
    return None
