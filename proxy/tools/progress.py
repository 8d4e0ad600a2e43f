"""Progress display for the tools: rich bars on a terminal, nothing (but messages) elsewhere."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from proxy.units import human_size


def row_label(image: str, what: str) -> str:
    """A blob's progress row: the image it is for, then the start of its digest (or the
    end of its file name in an archive)."""
    image = image if len(image) <= 40 else "…" + image[-39:]
    _, sep, encoded = what.partition(":")
    return f"{image} {encoded[:12] if sep else what[-24:]}"


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
        )
        from rich.progress import Progress as _Progress

        self.console = Console(stderr=True)
        self._progress = _Progress(
            TextColumn("{task.description}", table_column=None, markup=False),
            BarColumn(bar_width=30),
            DownloadColumn(binary_units=True),  # KiB/MiB, as the summaries print
            _speed_column(),
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


def _speed_column() -> Any:
    """rich's transfer speed in binary units (its own column prints decimal MB/s)."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class BinarySpeed(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{human_size(speed)}/s", style="progress.data.speed")

    return BinarySpeed()


def make_progress(enabled: bool | None = None) -> Progress:
    """Rich bars when ``enabled`` (``None``: when stderr is a terminal), else the no-op."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return RichProgress() if enabled else Progress()
