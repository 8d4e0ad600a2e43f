"""A per-upstream circuit breaker, so that an outage costs one timeout, not one per request.

With a ``path`` the breaker is one for every process on the host (the workers of a
server): the file exists while the circuit is open, its mtime is when it (re)opened, and
the process sending the half-open probe holds its ``flock``. So a worker never probes an
upstream another worker has just found dead, and one probe goes out per cooldown, not one
per worker. Reading the state costs one ``stat``, and only requests bound upstream ask.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

log = logging.getLogger("regproxy.upstream")


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; lets one probe through after ``cooldown``."""

    def __init__(self, threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.time, path: Path | None = None, *,
                 name: str = "upstream") -> None:
        self.name = name  #: the upstream's, for the log lines when it opens and closes
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock  #: wall-clock time: the file's mtime is compared with it
        self._path = None if path is None else str(path)
        self._failures = 0  #: consecutive failures seen by this process
        self._opened_at: float | None = None  #: without a file, or when it cannot be written
        self._probing = False
        self._probe_fd: int | None = None  #: the file, locked while this process probes

    def _opened(self) -> float | None:
        if self._path is None:
            return self._opened_at
        try:
            return os.stat(self._path).st_mtime
        except OSError:
            return self._opened_at  # (set only while the file could not be written)

    @property
    def state(self) -> BreakerState:
        opened = self._opened()
        if opened is None:
            return BreakerState.CLOSED
        if self._clock() - opened >= self.cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a request may go upstream now (in half-open state: one probe at a time,
        on the whole host). A probe must end in :meth:`success`, :meth:`failure` or
        :meth:`abandon`."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probing:
            return False
        if self._path is not None and self._opened_at is None:
            claimed = self._claim_probe(self._path)
            if claimed is None:
                return True  # closed meanwhile: not a probe, a request like any other
            if not claimed:
                return False
        self._probing = True
        return True

    def _claim_probe(self, path: str) -> bool | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # still the circuit's file, and not reopened by a probe that just failed
            st, now = os.fstat(fd), os.stat(path)
            if ((st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
                    and self._clock() - st.st_mtime >= self.cooldown):
                self._probe_fd = fd
                return True
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
        return False

    def success(self) -> None:
        if self._probing:  # (a request that found it closed says nothing)
            log.warning("upstream %s: circuit breaker closed (a probe request succeeded)", self.name)
        self._failures = 0
        self._opened_at = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        self._end_probe()

    def failure(self) -> None:
        self._failures += 1
        if self._probing:
            log.info("upstream %s: circuit breaker stays open (the probe request failed); "
                     "next probe in %g s", self.name, self.cooldown)
            self._open()
        elif self._opened() is not None:  # opened by another worker, which said so
            self._open()
        elif self._failures >= self.threshold:
            log.warning("upstream %s: circuit breaker open after %d consecutive failure(s); "
                        "requests fail fast (or are served stale) for %g s, then one probes",
                        self.name, self._failures, self.cooldown)
            self._open()
        self._end_probe()

    def abandon(self) -> None:
        """A probe that ended without an answer (its request was cancelled): the next
        request may probe instead."""
        self._end_probe()

    def _open(self) -> None:
        now = self._clock()
        self._opened_at = now
        if self._path is None:
            return
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.utime(fd, (now, now))
            finally:
                os.close(fd)
        except OSError:  # (a full or read-only disk): this process stays open on its own
            return
        self._opened_at = None

    def _end_probe(self) -> None:
        self._probing = False
        if self._probe_fd is not None:
            os.close(self._probe_fd)  # (which lets go of the lock)
            self._probe_fd = None
