"""Progress display for the tools: rich bars on a terminal, nothing (but messages) elsewhere."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class Progress:
    """No-op progress: the interface the tools use. Messages go to stderr."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def overall(self, description: str, total: int | None = None) -> Any:
        """The overall bar (bytes); returns its handle."""
        return None

    def task(self, description: str, total: int | None) -> Any:
        """A bar for one blob, shown while it transfers."""
        return None

    def advance(self, task: Any, amount: int, overall: Any = None) -> None:
        """``amount`` more bytes done for ``task`` (and the ``overall`` bar)."""

    def rewind(self, task: Any, overall: Any = None) -> None:
        """A transfer restarts: take back what ``task`` counted (on both bars)."""

    def done(self, task: Any) -> None:
        """Remove a finished blob's bar."""

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


class RichProgress(Progress):
    """rich.progress bars on stderr: one overall, one per blob in flight."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as _Progress

        self.console = Console(stderr=True)
        self._progress = _Progress(
            TextColumn("[bold]{task.description}", table_column=None),
            BarColumn(bar_width=30),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._done: dict[Any, int] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def overall(self, description: str, total: int | None = None) -> Any:
        task = self._progress.add_task(description, total=total)
        self._done[task] = 0
        return task

    def task(self, description: str, total: int | None) -> Any:
        task = self._progress.add_task(description, total=total)
        self._done[task] = 0
        return task

    def advance(self, task: Any, amount: int, overall: Any = None) -> None:
        for t in (task, overall):
            if t is not None:
                self._done[t] = self._done.get(t, 0) + amount
                self._progress.update(t, advance=amount)

    def rewind(self, task: Any, overall: Any = None) -> None:
        if task is None:
            return
        amount = self._done.get(task, 0)
        self._done[task] = 0
        self._progress.reset(task)
        if overall is not None and amount:
            self._done[overall] = self._done.get(overall, 0) - amount
            self._progress.update(overall, advance=-amount)

    def done(self, task: Any) -> None:
        if task is not None:
            self._done.pop(task, None)
            self._progress.remove_task(task)

    def log(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False)


def make_progress(enabled: bool | None = None) -> Progress:
    """Rich bars when ``enabled`` (``None``: when stderr is a terminal), else the no-op."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return RichProgress() if enabled else Progress()
