"""Telling a local storage failure (a full disk) from everything else.

A write that fails because the disk is full, read-only or failing is the proxy's own
trouble: clients get a 503 UNAVAILABLE that says so (they may try their next mirror), the
log gets one line that names the disk, and the upstream is not blamed for it (no upstream
error, no circuit breaker failure).
"""

from __future__ import annotations

import errno

from proxy.errors import StorageFailed

_WHY = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted (the disk is full for this user)",
    errno.EROFS: "the disk is read-only",
    errno.EIO: "the disk failed (I/O error)",
}


def storage_failure(exc: BaseException) -> StorageFailed | None:
    """The error to answer for ``exc`` if it is a local storage failure, else ``None``."""
    if isinstance(exc, StorageFailed):
        return exc
    if not isinstance(exc, OSError) or exc.errno not in _WHY:
        return None
    return StorageFailed(f"local storage failed: {_WHY[exc.errno]} ({exc.strerror})")
