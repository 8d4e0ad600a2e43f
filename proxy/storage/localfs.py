"""Local file primitives shared by the filesystem driver and the staging area.

Every temp file in ``tmp/`` is *held*: its writer keeps an exclusive ``flock`` on it until
the file is renamed or removed, so start-up cleaning (:meth:`Staging.clean_tmp
<proxy.storage.staging.Staging.clean_tmp>`) can tell what a live process (a sibling
worker, a replica on a shared filesystem) is writing from what a killed one left, however
young. :class:`BlobWriter` writes one object that way, hashing as it goes, and publishes
it by ``rename``: fsync the file, rename, fsync the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from proxy.errors import DigestInvalid, SizeInvalid
from proxy.reference import Digest

#: Temp files whose writer holds their ``flock``, by suffix: fills and their claims (see
#: :mod:`proxy.storage.staging`), objects and small files being written.
HELD_SUFFIXES = (".fill", ".claim", ".part", ".meta")
#: Readiness probes (held too), by prefix.
PROBE_PREFIX = "ready-"

#: Buffers one ``writev`` takes (Linux refuses more than 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


def file_id(st: os.stat_result) -> tuple[int, int]:
    """Which file a stat result is of, whatever its name."""
    return st.st_dev, st.st_ino


def same_file(fd: int, path: str | Path) -> bool:
    """Whether ``path`` (still) names the file open as ``fd``."""
    try:
        return file_id(os.fstat(fd)) == file_id(os.stat(path))
    except FileNotFoundError:
        return False


def create_held(path: str | Path, flags: int = os.O_WRONLY) -> int | None:
    """Create ``path`` (exclusively) and hold its ``flock``: start-up cleaning removes a
    file in ``tmp/`` whose lock is free. ``None`` if a cleaner removed it before the lock
    was taken (create another)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if same_file(fd, path):
        return fd
    os.close(fd)
    return None


def new_held(tmp_dir: Path, suffix: str, prefix: str = "") -> tuple[Path, int]:
    """A fresh held temp file ``tmp_dir/<prefix><random><suffix>`` and its descriptor."""
    while True:
        path = tmp_dir / f"{prefix}{secrets.token_hex(12)}{suffix}"
        fd = create_held(path)
        if fd is not None:
            return path, fd


def flock_nowait(fd: int) -> bool:
    """Take ``fd``'s exclusive ``flock`` if it is free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: str | Path, final: str) -> None:
    """Rename ``path`` to ``final`` (atomic on POSIX), creating ``final``'s directory if
    this is its first file (a shard directory, a new repository)."""
    try:
        os.replace(path, final)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(path, final)


def _nowhere(digest: Digest) -> str | None:
    return None


class BlobWriter:
    """Writes one object to a held temp file, hashing as it goes; :meth:`publish` renames it
    to ``final(digest)``.

    Writes are plain ``os.write`` calls on the event loop thread: they land in the page
    cache, which is cheaper than a thread hop per chunk (see performance notes).

    A *fill* writer (see :meth:`Staging.claim_fill <proxy.storage.staging.Staging.claim_fill>`)
    writes to a well-known path, ``tmp/<alg>-<hex>.fill``, holding an exclusive ``flock``
    until it has renamed or removed the file: other processes on the same store find the
    in-progress download there, tail it, and can tell a live filler (lock held) from a dead
    one (lock free).
    """

    def __init__(self, tmp_dir: Path, algorithm: str = "sha256", *,
                 final: Callable[[Digest], str | None] = _nowhere,
                 path: Path | None = None, fd: int | None = None) -> None:
        if path is None or fd is None:  # held while written, as fills are
            path, fd = new_held(tmp_dir, ".part")
        self.path = path
        self._final = final
        # hints for processes tailing a fill, as plain strings: this runs once per blob on
        # the event loop, where pathlib's cost shows up in profiles of small-blob pulls
        base = str(path)[:-len(path.suffix)] if path.suffix == ".fill" else None
        self._hints = None if base is None else (base + ".size", base + ".ok", base + ".prefix")
        self._fd: int | None = fd
        self._file_id = file_id(os.fstat(fd))  #: which file is ours, whatever its name
        self._hash = hashlib.new(algorithm)
        self._algorithm = algorithm
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; a short write (ENOSPC) raises instead of leaving a hole."""
        self.write_many([data])

    def write_many(self, chunks: list[bytes] | list[bytes | memoryview]) -> None:
        """Append ``chunks`` in order with ``writev`` (no joining copy), at most
        ``IOV_MAX`` buffers per call."""
        assert self._fd is not None
        views = [memoryview(c) for c in chunks]
        first = 0
        while first < len(views):
            n = os.writev(self._fd, views[first:first + _IOV_MAX])
            while first < len(views) and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if n:
                views[first] = views[first][n:]
        for chunk in chunks:
            self._hash.update(chunk)
            self.size += len(chunk)

    def write_at(self, chunks: list[bytes], offset: int) -> None:
        """Write ``chunks`` at ``offset`` (a ranged fill's part), neither hashed nor counted
        yet: :meth:`absorb` does that once the bytes before them are in. Thread-safe for
        disjoint ranges; a short write raises instead of leaving a hole."""
        assert self._fd is not None
        views = [memoryview(c) for c in chunks]
        first = 0
        while first < len(views):
            n = os.pwritev(self._fd, views[first:first + _IOV_MAX], offset)
            if n == 0:
                raise OSError(28, "No space left on device")
            offset += n
            while first < len(views) and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if n:
                views[first] = views[first][n:]

    def absorb(self, end: int, chunk: int = 1 << 20) -> None:
        """Hash the bytes written with :meth:`write_at` from what is hashed so far up to
        ``end`` (they must all be written), in order, so :meth:`verify` covers them."""
        assert self._fd is not None
        while self.size < end:
            data = os.pread(self._fd, min(chunk, end - self.size), self.size)
            if not data:
                raise OSError(5, "fill file shorter than its written parts")
            self._hash.update(data)
            self.size += len(data)

    def announce_prefix(self, written: int) -> None:
        """Tell processes tailing a ranged fill (whose file grows out of order) how many
        bytes from the start are written (``.prefix``; atomic, as the size hint)."""
        if self._hints is not None:
            tmp = f"{self._hints[2]}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:
                    os.write(fd, str(written).encode())
                finally:
                    os.close(fd)
                os.replace(tmp, self._hints[2])
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def drop_prefix_hint(self) -> None:
        """Remove a ``.prefix`` hint a dead filler of the same digest left behind."""
        if self._hints is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._hints[2])

    def digest(self) -> Digest:
        """The digest of what was written so far."""
        return Digest(self._algorithm, self._hash.hexdigest())

    def verify(self, expected: Digest, expected_size: int | None = None) -> None:
        """Raise unless the content matches ``expected`` (and ``expected_size``)."""
        if expected_size is not None and self.size != expected_size:
            raise SizeInvalid(f"got {self.size} bytes, expected {expected_size}")
        if expected.algorithm != self._algorithm or self.digest() != expected:
            raise DigestInvalid(f"content digest {self.digest()} does not match {expected}")

    def open_reader(self, digest: Digest) -> int:
        """A read-only descriptor of this file: at its temp path or, once published as
        ``digest``, at its final one (the same bytes; the temp path may by then name a
        sibling worker's new fill). ``FileNotFoundError`` if neither."""
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self.path, os.O_RDONLY)
            if file_id(os.fstat(fd)) == self._file_id:
                return fd
            os.close(fd)
        final = self._final(digest)
        if final is None:
            raise FileNotFoundError(f"{self.path} is gone and {digest} is not a local file")
        return os.open(final, os.O_RDONLY)

    def publish(self, digest: Digest) -> Path:
        """fsync the temp file, rename it to its content address (atomic on POSIX), let go
        of the file (and of its lock, for a fill) and fsync the directory. Blocking: big
        and pull-through objects call it from a thread."""
        assert self._fd is not None
        final = self._final(digest)
        if final is None:
            raise RuntimeError("this store keeps no local files: its fill sink publishes")
        os.fsync(self._fd)
        replace(self.path, final)
        self._close()
        fsync_dir(os.path.dirname(final))
        return Path(final)

    def commit(self, expected: Digest, expected_size: int | None = None) -> Path:
        """Verify, sync and publish in one go."""
        self.verify(expected, expected_size)
        return self.publish(expected)

    def abort(self) -> None:
        """Drop the temp file; nothing becomes visible."""
        if self._fd is not None:  # unlink while still holding a fill's lock
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._close()

    def announce_size(self, size: int | None) -> None:
        """Tell other processes tailing this fill how big the blob is (``-1``: unknown)."""
        if self._hints is not None:  # a hint for live processes: no fsync needed
            tmp = f"{self._hints[0]}.{secrets.token_hex(4)}"  # goes with its fill at start-up
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:
                    os.write(fd, str(-1 if size is None else size).encode())
                finally:
                    os.close(fd)
                os.replace(tmp, self._hints[0])  # atomic: a reader never sees half a number
            except BaseException:  # a full disk: leave no temp file behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def announce_verified(self) -> None:
        """Tell processes tailing this fill that its digest checked out (``.ok``), so they
        can finish their clients before the fsync and rename, as in-process readers do."""
        if self._hints is not None:
            os.close(os.open(self._hints[1], os.O_WRONLY | os.O_CREAT, 0o644))

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None  # first: after a rename, self.path is not ours
            for hint in self._hints or ():
                with contextlib.suppress(OSError):  # stale hints go at start-up
                    os.unlink(hint)
            with contextlib.suppress(OSError):
                os.close(fd)
