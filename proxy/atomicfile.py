"""Writing key and secret files atomically, immune to a planted temp file.

A fixed temp name (``.server.key.tmp``) opened with ``O_CREAT|O_TRUNC`` keeps the mode of a
file someone left there (a world-readable key) and follows a symlink there (the key written
wherever it points). Here the data goes to a fresh file that :func:`tempfile.mkstemp`
creates in the target's directory (``O_EXCL``, mode 0600 whatever the umask, so nothing that
already exists is ever opened), is fsynced, gets its final mode and is renamed over the
target (a rename replaces a symlink at the target rather than following it). Readers see
the old content or the new, never a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` with ``mode`` (0600 unless said otherwise).

    With ``replace=False`` an existing ``path`` is left as it is and False is returned: of
    writers racing to create it (workers starting together), exactly one wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
            created = True
        else:
            try:
                os.link(tmp, path)  # fails on any existing path, a symlink included
                created = True
            except FileExistsError:
                created = False
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if created:
        _fsync_dir(path.parent)
    return created


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; some filesystems cannot open or sync a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
