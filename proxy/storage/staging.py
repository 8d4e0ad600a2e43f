"""The local staging area: what fills and uploads write before it becomes an object, on
every backend (on S3 too, a fill tees into a local temp file that sibling workers tail).

Layout under the storage root (docs/architecture.md, "On-disk layout")::

    tmp/        files being written, each held by its writer's flock (see proxy.storage.localfs)
    locks/      lock files shared by the worker processes, and open circuit breakers
    uploads/    resumable blob uploads (hosted, see proxy.storage.uploads)

A fill is a held file at a well-known path, ``tmp/<alg>-<hex>.fill``: other processes on
the same root find the in-progress download there, tail it, and tell a live filler (lock
held) from a dead one (lock free). On the filesystem backend the staging area shares the
store's root, and a verified fill is renamed into the store (``final_path``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from proxy.reference import Digest
from proxy.storage.localfs import (
    HELD_SUFFIXES,
    PROBE_PREFIX,
    BlobWriter,
    flock_nowait,
    new_held,
    same_file,
)


def _nowhere(digest: Digest) -> str | None:
    return None


class Staging:
    """Fills, locks and temp files under ``root``. ``final_path(digest)`` is where a
    published fill goes (the store's local file), ``None`` on a store without local files
    (whose fills publish through their sink instead)."""

    def __init__(self, root: Path, final_path: Callable[[Digest], str | None] = _nowhere
                 ) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self._final = final_path

    def open(self, *, clean: bool = True) -> None:
        """Create the layout and (``clean``) remove temp files a crash or kill left behind."""
        for sub in ("tmp", "uploads", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if clean:
            self.clean_tmp()

    def clean_tmp(self, min_age: float = 600.0) -> None:
        """Remove what crashed writers left in ``tmp/``, and only that: another process on
        the same storage (a sibling worker, a replica) may be writing there right now.
        Every writer here holds its file's ``flock`` while it writes (fills, claims, object
        and metadata temp files, readiness probes): such a file is abandoned when its lock
        is free, however young. A fill's hints (``.size``, ``.ok`` and the ``.size.<hex>``
        being written) go when their fill has gone. Anything else (a file of an older
        version) when older than ``min_age`` seconds. Lock files in ``locks/`` go when free."""
        entries = sorted(self.tmp_dir.iterdir(), key=lambda p: p.suffix != ".fill")
        now = time.time()
        for entry in entries:  # fills first, so their hints can go with them
            with contextlib.suppress(OSError):
                name = entry.name
                if entry.suffix in HELD_SUFFIXES or name.startswith(PROBE_PREFIX):
                    self._remove_if_abandoned(entry)
                elif (entry.suffix in (".size", ".ok", ".prefix") or ".size." in name
                      or ".prefix." in name):
                    if not (self.tmp_dir / f"{name.partition('.')[0]}.fill").exists():
                        entry.unlink()
                elif now - entry.stat().st_mtime > min_age:
                    entry.unlink()
        locks = self.root / "locks"
        for lock in locks.iterdir() if locks.is_dir() else ():  # left by killed processes
            with contextlib.suppress(OSError), self._held_lock(lock) as held:
                if held:
                    lock.unlink()  # (holding it, as try_lock's holders do)

    def probe_writable(self) -> str | None:
        """Write and remove a small file in ``tmp/`` (``/readyz``); the error if that fails.
        The probe is held like any temp file, and removed whatever happens."""
        try:
            probe, fd = new_held(self.tmp_dir, "", PROBE_PREFIX)
        except OSError as exc:
            return str(exc.strerror)
        try:
            os.write(fd, b"ok")
        except OSError as exc:
            return str(exc.strerror)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
            os.close(fd)
        return None

    # -- fills shared between processes ------------------------------------------------

    def fill_path(self, digest: Digest) -> Path:
        return self.tmp_dir / f"{digest.algorithm}-{digest.hex}.fill"

    def claim_fill(self, digest: Digest) -> BlobWriter | None:
        """Become the one process filling ``digest``, or ``None`` if a live one already is.

        The file is created under a random name, locked, and only then linked to the
        well-known name, so nobody ever sees an unlocked fill file of a live filler. A fill
        file whose lock is free was left by a dead process and is taken over.
        """
        path = self.fill_path(digest)
        for _ in range(3):
            tmp = self.tmp_dir / f"{secrets.token_hex(12)}.claim"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                os.link(tmp, path)
            except FileExistsError:
                os.unlink(tmp)
                os.close(fd)
                if not self._remove_if_abandoned(path):
                    return None
                continue
            os.unlink(tmp)
            return BlobWriter(self.tmp_dir, digest.algorithm, final=self._final, path=path,
                              fd=fd)
        return None

    def _remove_if_abandoned(self, path: Path) -> bool:
        """Remove a temp file (a fill) nobody holds the lock of; True if it is gone now."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            if self.filler_alive(fd):
                return False
            with contextlib.suppress(FileNotFoundError):
                if same_file(fd, path):
                    os.unlink(path)
            return True
        finally:
            os.close(fd)

    def open_fill(self, digest: Digest) -> int | None:
        """Open another process's in-progress fill for tailing (``None`` if there is none)."""
        try:
            return os.open(self.fill_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def fill_verified(self, digest: Digest) -> bool:
        """Whether the blob is published here, or its running fill announced a verified
        digest."""
        final = self._final(digest)
        return (final is not None and os.path.exists(final)) or self.fill_path(
            digest).with_suffix(".ok").exists()

    def fill_size(self, digest: Digest) -> int | bool | None:
        """The size a filler announced: an int, ``None`` if unknown (chunked), ``False`` if
        it has not announced one yet."""
        try:
            value = int(self.fill_path(digest).with_suffix(".size").read_text() or "x")
        except (FileNotFoundError, ValueError):
            return False
        return None if value < 0 else value

    def fill_prefix(self, digest: Digest) -> int | None:
        """The written prefix a ranged fill announced (its file grows out of order), or
        ``None`` for a fill written in order (whose file size is its progress)."""
        try:
            return int(self.fill_path(digest).with_suffix(".prefix").read_text())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def filler_alive(fd: int) -> bool:
        """Whether some process still holds the exclusive lock of an open fill file."""
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    # -- locks shared by the processes of a host ---------------------------------------

    def lock_path(self, name: str) -> Path:
        """The file in ``locks/`` that the processes on this host share for ``name`` (a
        lock, or state such as an upstream's circuit breaker); start-up cleaning removes
        it when no process holds its lock."""
        return self.root / "locks" / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}"

    @contextlib.contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """A lock the processes on this host share (sibling workers), not waited for:
        yields whether this process holds it. Its file (in ``locks/``) goes when the
        holder is done, so a lock counts only while its file is still the one at the path
        (a process that opened the file just before it went locks a file nobody sees)."""
        path = self.lock_path(name)
        with self._held_lock(path) as held:
            if not held:
                yield False
                return
            try:
                yield True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    @staticmethod
    @contextlib.contextmanager
    def _held_lock(path: Path) -> Iterator[bool]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            yield same_file(fd, path) and flock_nowait(fd) and same_file(fd, path)
        finally:
            os.close(fd)
