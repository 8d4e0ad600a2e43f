"""Content-addressed store on a local filesystem.

Layout under the root (documented in docs/architecture.md, "On-disk layout")::

    blobs/<alg>/<hex[:2]>/<hex>                  bytes of every blob and manifest, stored once
    manifests/<alg>/<hex[:2]>/<hex>              media type of a stored manifest (bytes in blobs/)
    repositories/<name>/_tags/<tag>              digest that <tag> last pointed to
    repositories/<name>/_manifests/<alg>/<hex>   marker: <name> holds this manifest
    repositories/<name>/_layers/<alg>/<hex>      marker: <name> holds this blob (hosted)
    repositories/<name>/_referrers/<alg>/<subject-hex>/<alg>-<hex>
                                                 marker: manifest <hex> has <subject> as subject
    uploads/<uuid>/{data,repo,started}           resumable blob uploads (hosted)
    tmp/                                         files being written (removed at start-up)
    locks/                                       lock files shared by the worker processes, and
                                                 open circuit breakers (mtime: when opened)
    layout                                       the layout's version (see proxy.layout)

Nothing appears under ``blobs/`` or ``manifests/`` before its digest and size were checked
and its bytes fsynced: writers fill a temp file and ``rename`` it into place. Repository
name components cannot start with ``_`` (see :mod:`proxy.reference`), so ``_tags`` and
``_manifests`` never collide with a nested repository.
"""

# The async methods do their local file operations inline on purpose: a stat, a small read
# or a rename costs microseconds, less than a thread hop (fsyncs and big reads go to threads).
# ruff: noqa: ASYNC230, ASYNC240

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from proxy.errors import DigestInvalid, SizeInvalid
from proxy.reference import Digest
from proxy.storage.base import BlobStat, StoredManifest

#: Temp files whose writer holds their ``flock`` (see :meth:`FilesystemStore.clean_tmp`),
#: by suffix, and the readiness probes, by prefix.
_HELD_SUFFIXES = (".fill", ".claim", ".part", ".meta")
_PROBE_PREFIX = "ready-"

_TAGS = "_tags"
_MANIFESTS = "_manifests"
_LAYERS = "_layers"
_REFERRERS = "_referrers"


#: Buffers one ``writev`` takes (Linux refuses more than 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


def _file_id(st: os.stat_result) -> tuple[int, int]:
    """Which file a stat result is of, whatever its name."""
    return st.st_dev, st.st_ino


def _same_file(fd: int, path: str | Path) -> bool:
    """Whether ``path`` (still) names the file open as ``fd``."""
    try:
        return _file_id(os.fstat(fd)) == _file_id(os.stat(path))
    except FileNotFoundError:
        return False


def _create_held(path: str | Path, flags: int = os.O_WRONLY) -> int | None:
    """Create ``path`` (exclusively) and hold its ``flock``: start-up cleaning removes a
    file in ``tmp/`` whose lock is free. ``None`` if a cleaner removed it before the lock
    was taken (create another)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if _same_file(fd, path):
        return fd
    os.close(fd)
    return None


def _flock_nowait(fd: int) -> bool:
    """Take ``fd``'s exclusive ``flock`` if it is free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class BlobWriter:
    """Writes one object to a temp file, hashing as it goes; :meth:`publish` makes it visible.

    Writes are plain ``os.write`` calls on the event loop thread: they land in the page
    cache, which is cheaper than a thread hop per chunk (see performance notes).

    A *fill* writer (see :meth:`FilesystemStore.claim_fill`) writes to a well-known path,
    ``tmp/<alg>-<hex>.fill``, holding an exclusive ``flock`` until it has renamed or removed
    the file: other processes on the same store find the in-progress download there, tail
    it, and can tell a live filler (lock held) from a dead one (lock free).
    """

    def __init__(self, store: FilesystemStore, algorithm: str = "sha256",
                 path: Path | None = None, fd: int | None = None) -> None:
        self._store = store
        while path is None or fd is None:  # held while written, as fills are
            path = store.tmp_dir / f"{secrets.token_hex(12)}.part"
            fd = _create_held(path)
        self.path = path
        # hints for processes tailing a fill, as plain strings: this runs once per blob on
        # the event loop, where pathlib's cost shows up in profiles of small-blob pulls
        base = str(path)[:-len(path.suffix)] if path.suffix == ".fill" else None
        self._hints = None if base is None else (base + ".size", base + ".ok")
        self._fd: int | None = fd
        self._file_id = _file_id(os.fstat(fd))  #: which file is ours, whatever its name
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
            if _file_id(os.fstat(fd)) == self._file_id:
                return fd
            os.close(fd)
        return os.open(self._store.blob_file(digest), os.O_RDONLY)

    def publish(self, digest: Digest) -> Path:
        """fsync the temp file, rename it to its content address (atomic on POSIX), let go
        of the file (and of its lock, for a fill) and fsync the directory. Blocking: big
        and pull-through objects call it from a thread."""
        assert self._fd is not None
        os.fsync(self._fd)
        final = self._store.blob_file(digest)
        try:
            os.replace(self.path, final)
        except FileNotFoundError:  # the first object of its shard directory
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(self.path, final)
        self._close()
        self._store.fsync_dir(Path(final).parent)
        return Path(final)

    def commit(self, expected: Digest, expected_size: int | None = None) -> Path:
        """Verify, sync and publish in one go (for small objects)."""
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


class FilesystemStore:
    """The local, content-addressed store. All paths come from validated names and digests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self._repos = root / "repositories"
        self._blobs = str(root / "blobs")

    def open(self, *, clean: bool = True) -> None:
        """Create the layout and (``clean``) remove temp files a crash or kill left behind."""
        for sub in ("blobs", "manifests", "repositories", "tmp", "uploads", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        shards = self.root / "blobs" / "sha256"
        if not (shards / "ff").is_dir():  # all 256 up front: no mkdir on a cold fill's path
            for i in range(256):
                (shards / f"{i:02x}").mkdir(parents=True, exist_ok=True)
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
                if entry.suffix in _HELD_SUFFIXES or name.startswith(_PROBE_PREFIX):
                    self._remove_if_abandoned(entry)
                elif entry.suffix in (".size", ".ok") or ".size." in name:
                    if not (self.tmp_dir / f"{name.partition('.')[0]}.fill").exists():
                        entry.unlink()
                elif now - entry.stat().st_mtime > min_age:
                    entry.unlink()
        locks = self.root / "locks"
        for lock in locks.iterdir() if locks.is_dir() else ():  # left by killed processes
            with contextlib.suppress(OSError), self._held_lock(lock) as held:
                if held:
                    lock.unlink()  # (holding it, as try_lock's holders do)

    # -- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return Path(self.blob_file(digest))

    def blob_file(self, digest: Digest) -> str:
        """:meth:`blob_path` as a string, for the per-request paths (cheaper than pathlib)."""
        return f"{self._blobs}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def stored_size(self, digest: Digest) -> int | None:
        """Size of a stored blob, or ``None`` when absent (synchronous: a local ``stat``)."""
        try:
            return os.stat(self.blob_file(digest)).st_size
        except FileNotFoundError:
            return None

    async def blob_size(self, digest: Digest) -> int | None:
        return self.stored_size(digest)

    async def purge_incomplete(self, older_than: float) -> int:
        """Nothing to do: ``tmp/`` is cleaned at start-up (:meth:`clean_tmp`)."""
        return 0

    async def check(self) -> str | None:
        return None  # /readyz probes the local store by writing to it

    def local_path(self, digest: Digest) -> Path | None:
        """Where a stored blob can be sent from with ``sendfile``."""
        return self.blob_path(digest)

    async def open_blob(self, digest: Digest, start: int = 0, end: int | None = None
                        ) -> AsyncIterator[bytes]:
        with open(self.blob_path(digest), "rb") as fh:
            fh.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                chunk = fh.read(1 << 20 if left is None else min(left, 1 << 20))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    async def redirect_url(self, digest: Digest) -> str | None:
        return None

    def fill_sink(self, digest: Digest) -> None:
        """Nothing: a fill's temp file is renamed into place."""
        return None

    async def import_file(self, path: Path, digest: Digest, size: int) -> None:
        """Publish a verified local file (a finished upload) as object ``digest``."""
        await asyncio.get_running_loop().run_in_executor(None, self._import_file, path,
                                                         digest, size)

    def _import_file(self, path: Path, digest: Digest, size: int) -> None:
        final = self.blob_path(digest)
        if self.stored_size(digest) == size:
            os.utime(final)  # already stored: keep the existing file, refresh for GC
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
        self.fsync_dir(final.parent)

    async def delete_blob(self, digest: Digest, *, older_than: float | None = None) -> bool:
        """Remove a stored object (and a manifest's media type); with ``older_than``, only
        if it was not used since (re-checked right before, so a revived object stays)."""
        path = self.blob_path(digest)
        try:
            if older_than is not None and os.stat(path).st_mtime >= older_than:
                return False
            with contextlib.suppress(FileNotFoundError):
                self._media_type_path(digest).unlink()
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    async def blob_stats(self) -> AsyncIterator[BlobStat]:
        """Every stored object with its size and last use (GC and eviction)."""
        for digest in self.iter_blob_digests():
            try:
                st = os.stat(self.blob_file(digest))
            except FileNotFoundError:
                continue
            yield BlobStat(digest, st.st_size, st.st_mtime)

    def new_writer(self, algorithm: str = "sha256") -> BlobWriter:
        return BlobWriter(self, algorithm)

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small object (a manifest) after checking its digest."""
        if self.stored_size(digest) == len(data):
            return
        writer = self.new_writer(digest.algorithm)
        try:
            writer.write(data)
            writer.commit(digest, len(data))
        except BaseException:
            writer.abort()
            raise

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
            return BlobWriter(self, digest.algorithm, path=path, fd=fd)
        return None

    def probe_writable(self) -> str | None:
        """Write and remove a small file in ``tmp/`` (``/readyz``); the error if that fails.
        The probe is held like any temp file, and removed whatever happens."""
        try:
            while (fd := _create_held(probe := self.tmp_dir / f"{_PROBE_PREFIX}{secrets.token_hex(6)}")
                   ) is None:
                pass
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
                if _same_file(fd, path):
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
        """Whether the blob is stored, or its running fill announced a verified digest."""
        return self.stored_size(digest) is not None or self.fill_path(digest).with_suffix(
            ".ok").exists()

    def fill_size(self, digest: Digest) -> int | bool | None:
        """The size a filler announced: an int, ``None`` if unknown (chunked), ``False`` if
        it has not announced one yet."""
        try:
            value = int(self.fill_path(digest).with_suffix(".size").read_text() or "x")
        except (FileNotFoundError, ValueError):
            return False
        return None if value < 0 else value

    @staticmethod
    def filler_alive(fd: int) -> bool:
        """Whether some process still holds the exclusive lock of an open fill file."""
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

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
            yield _same_file(fd, path) and _flock_nowait(fd) and _same_file(fd, path)
        finally:
            os.close(fd)

    # -- manifests ---------------------------------------------------------------------

    def _media_type_path(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Store manifest bytes (verified) and then its media type, which makes it visible
        (off the event loop: both are fsynced)."""
        await asyncio.get_running_loop().run_in_executor(
            None, self._put_manifest, digest, data, media_type)

    def _put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        self.put_bytes(digest, data)
        self._write_small(self._media_type_path(digest), media_type.encode())

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        try:
            media_type = self._media_type_path(digest).read_text()
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        return StoredManifest(digest, media_type, data)

    async def has_manifest(self, digest: Digest) -> bool:
        return self._media_type_path(digest).exists()

    # -- repositories ------------------------------------------------------------------

    def _repo(self, name: str) -> Path:
        return self._repos / name

    def _marker(self, name: str, kind: str, digest: Digest) -> Path:
        return self._repo(name) / kind / digest.algorithm / digest.hex

    def _link(self, name: str, kind: str, digest: Digest) -> None:
        """Record that repository ``name`` holds ``digest`` (idempotent)."""
        marker = self._marker(name, kind, digest)
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()

    def _unlink(self, name: str, kind: str, digest: Digest) -> bool:
        try:
            self._marker(name, kind, digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def _list_links(self, name: str, kind: str) -> list[Digest]:
        base = self._repo(name) / kind
        out: list[Digest] = []
        with contextlib.suppress(FileNotFoundError):
            for alg in os.listdir(base):
                out.extend(Digest(alg, h) for h in os.listdir(base / alg))
        return out

    async def link_manifest(self, name: str, digest: Digest) -> None:
        self._link(name, _MANIFESTS, digest)

    async def has_manifest_link(self, name: str, digest: Digest) -> bool:
        return self._marker(name, _MANIFESTS, digest).exists()

    async def unlink_manifest(self, name: str, digest: Digest) -> bool:
        """Remove ``digest`` (and every tag pointing at it) from ``name``; True if it was there."""
        if not self._unlink(name, _MANIFESTS, digest):
            return False
        for tag in await self.list_tags(name) or []:
            if await self.get_tag(name, tag) == digest:
                await self.delete_tag(name, tag)
        return True

    async def link_blob(self, name: str, digest: Digest) -> None:
        """Hosted repositories: ``name`` holds blob ``digest``."""
        self._link(name, _LAYERS, digest)

    async def has_blob_link(self, name: str, digest: Digest) -> bool:
        return self._marker(name, _LAYERS, digest).exists()

    async def list_blob_links(self, name: str) -> list[Digest]:
        return self._list_links(name, _LAYERS)

    async def unlink_blob(self, name: str, digest: Digest) -> bool:
        return self._unlink(name, _LAYERS, digest)

    async def touch_blob(self, digest: Digest) -> None:
        """Mark a blob as just used, so a concurrent GC's grace period protects it."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.blob_path(digest))

    async def add_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        marker = (self._repo(name) / _REFERRERS / subject.algorithm / subject.hex
                  / f"{digest.algorithm}-{digest.hex}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    async def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._repo(name) / _REFERRERS / subject.algorithm / subject.hex
             / f"{digest.algorithm}-{digest.hex}").unlink()

    async def list_referrers(self, name: str, subject: Digest) -> list[Digest]:
        base = self._repo(name) / _REFERRERS / subject.algorithm / subject.hex
        try:
            entries = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        return [Digest(*e.split("-", 1)) for e in entries if "-" in e]

    async def list_manifest_links(self, name: str) -> list[Digest]:
        return self._list_links(name, _MANIFESTS)

    async def delete_tag(self, name: str, tag: str) -> bool:
        try:
            (self._repo(name) / _TAGS / tag).unlink()
            return True
        except FileNotFoundError:
            return False

    async def set_tag(self, name: str, tag: str, digest: Digest, *, confirmed: bool = False) -> None:
        """Point ``tag`` at ``digest``. ``confirmed``: the upstream just confirmed it, so the
        link's mtime (the time of the last confirmation) is refreshed even if unchanged."""
        path = self._repo(name) / _TAGS / tag
        try:
            if path.read_text() == str(digest):
                if confirmed:
                    os.utime(path)
                return
        except FileNotFoundError:
            pass
        self._write_small(path, str(digest).encode())

    async def tag_with_age(self, name: str, tag: str) -> tuple[Digest | None, float]:
        """A tag's digest and the seconds since it was last written or confirmed."""
        path = self._repo(name) / _TAGS / tag
        try:
            age = time.time() - os.stat(path).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None, 0.0
        return await self.get_tag(name, tag), age

    async def get_tag(self, name: str, tag: str) -> Digest | None:
        try:
            return Digest.parse(self._repo(name).joinpath(_TAGS, tag).read_text().strip())
        except Exception:  # absent, or a damaged link: treated as absent, never as a 500
            return None

    async def list_tags(self, name: str) -> list[str] | None:
        """Sorted tags of ``name``, or ``None`` when the repository does not exist."""
        repo = self._repo(name)
        if not any((repo / d).is_dir() for d in (_TAGS, _MANIFESTS, _LAYERS)):
            return None
        try:
            return sorted(p.name for p in (repo / _TAGS).iterdir())
        except FileNotFoundError:
            return []

    async def list_repositories(self) -> list[str]:
        """Sorted names of every repository holding a tag or a manifest."""
        names: list[str] = []
        for dirpath, dirnames, _files in os.walk(self._repos):
            if _TAGS in dirnames or _MANIFESTS in dirnames or _LAYERS in dirnames:
                names.append(os.path.relpath(dirpath, self._repos).replace(os.sep, "/"))
            dirnames[:] = [d for d in dirnames if not d.startswith("_")]
        return sorted(names)

    async def rename_repository(self, old: str, new: str) -> None:
        """Move ``old``'s ``_tags``/``_manifests``/``_layers``/``_referrers`` under ``new``
        (entries already there win), then drop the directories left empty."""
        for kind in (_TAGS, _MANIFESTS, _LAYERS, _REFERRERS):
            src, dst = self._repo(old) / kind, self._repo(new) / kind
            if src.is_dir():
                self._merge_dir(src, dst)
        top = self._repo(old)
        while top != self._repos and top.is_dir():
            try:
                top.rmdir()
            except OSError:  # not empty: nested repositories live on
                break
            top = top.parent

    @classmethod
    def _merge_dir(cls, src: Path, dst: Path) -> None:
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            return
        for entry in src.iterdir():
            target = dst / entry.name
            if entry.is_dir():
                cls._merge_dir(entry, target)
            elif not target.exists():
                os.rename(entry, target)
            else:
                entry.unlink()
        src.rmdir()

    async def layout_version(self) -> int | None:
        try:
            return int((self.root / "layout").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    async def set_layout_version(self, version: int) -> None:
        self._write_small(self.root / "layout", f"{version}\n".encode())

    async def purge_marker(self) -> str | None:
        try:
            return (self.root / "purged").read_text().strip()
        except FileNotFoundError:
            return None

    async def mark_purge(self) -> None:
        self._write_small(self.root / "purged", f"{secrets.token_hex(8)}\n".encode())

    # -- helpers -----------------------------------------------------------------------

    def _write_small(self, path: Path, data: bytes) -> None:
        """Atomically replace a small metadata file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while (fd := _create_held(tmp := self.tmp_dir / f"{secrets.token_hex(12)}.meta")) is None:
            pass
        try:
            with open(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                os.replace(tmp, path)  # (still holding the lock)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @staticmethod
    def fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def iter_blob_digests(self) -> Iterator[Digest]:
        """Every stored blob (used by GC and tests)."""
        base = self.root / "blobs"
        for alg_dir in base.iterdir():
            for shard in alg_dir.iterdir():
                for f in shard.iterdir():
                    yield Digest(alg_dir.name, f.name)
