"""The free-space watermark (``storage.min_free``): below it, uploads and new pull-through
fills are refused with a clear error rather than filling the disk under every other user
of it (the store, its temp files, the logs).

Asked on every upload chunk and fill, so the ``statvfs`` answer is kept for a second.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from proxy.errors import InsufficientStorage, Unavailable

log = logging.getLogger("regproxy.storage")


class FreeSpace:
    """Whether the filesystem holding ``root`` keeps at least ``min_bytes`` and
    ``min_percent`` % of its size free (0 and 0: no watermark)."""

    def __init__(self, root: Path, min_bytes: int = 0, min_percent: float = 0.0,
                 ttl: float = 1.0) -> None:
        self.root = root
        self.min_bytes = min_bytes
        self.min_percent = min_percent
        self.ttl = ttl
        self._room = True
        self._free = 0
        self._next = 0.0  #: monotonic time of the next statvfs
        self._warned = False

    def has_room(self) -> bool:
        """Whether the disk is above the watermark (measured at most once per ``ttl``)."""
        if not self.min_bytes and not self.min_percent:
            return True
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.ttl
            self._room = self._measure()
        return self._room

    def _measure(self) -> bool:
        try:
            st = os.statvfs(self.root)
        except OSError as exc:  # cannot tell: refusing every upload would be worse
            if not self._warned:
                log.warning("cannot check free space of %s (%s); not enforcing storage.min_free",
                            self.root, exc)
                self._warned = True
            return True
        self._free = st.f_bavail * st.f_frsize
        need = max(self.min_bytes, st.f_blocks * st.f_frsize * self.min_percent / 100)
        return self._free >= need

    def _why(self) -> str:
        limit = " and ".join(part for part in (
            f"{self.min_bytes} bytes" if self.min_bytes else "",
            f"{self.min_percent:g}%" if self.min_percent else "") if part)
        return f"only {self._free} bytes free on the disk, below storage.min_free ({limit})"

    def check_upload(self) -> None:
        """507 INSUFFICIENT STORAGE for an upload or chunk when the disk is too full."""
        if not self.has_room():
            raise InsufficientStorage(f"cannot accept upload data: {self._why()}")

    def check_fill(self) -> None:
        """503 UNAVAILABLE for a new pull-through fill (clients fall back to the upstream)."""
        if not self.has_room():
            raise Unavailable(f"cannot cache new content: {self._why()}")
