"""The filesystem driver: one file per key under the store's root (one host, or a shared
POSIX filesystem).

Writes go to a held temp file in ``<root>/tmp/`` (see :mod:`proxy.storage.localfs`), are
fsynced and renamed into place, so a crash or kill never leaves a partial object visible.
"""

# The async methods do their local file operations inline on purpose: a stat, a small read
# or a rename costs microseconds, less than a thread hop (fsyncs go to threads). Paths are
# plain strings: pathlib's cost shows on the per-request paths.
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import contextlib
import os
import stat as st_mode
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from proxy.errors import SizeInvalid
from proxy.reference import Digest
from proxy.storage.driver.base import Content, FileInfo
from proxy.storage.localfs import BlobWriter, fsync_dir, replace

#: Bytes per read of :meth:`FilesystemDriver.read`.
READ_CHUNK = 1 << 20
#: Builds a named tuple without its Python-level ``__new__`` (a third of a stat's cost).
_new = tuple.__new__


class FilesystemDriver:
    """Keys are paths below ``root``."""

    local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = str(root)
        self._tmp = root / "tmp"

    def open(self) -> None:
        """Create the top-level directories (and every ``sha256`` shard of ``blobs/``)."""
        for sub in ("blobs", "manifests", "repositories", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        shards = self.root / "blobs" / "sha256"
        if not (shards / "ff").is_dir():  # all 256 up front: no mkdir on a cold fill's path
            for i in range(256):
                (shards / f"{i:02x}").mkdir(parents=True, exist_ok=True)

    def local_path(self, key: str) -> str:
        return f"{self._root}/{key}"

    async def stat(self, key: str, *, last_use: bool = False) -> FileInfo | None:
        """(An object's mtime is its last use: :meth:`touch` sets it.)"""
        try:
            st = os.stat(f"{self._root}/{key}")
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _new(FileInfo, (st.st_size, st.st_mtime)) if st_mode.S_ISREG(st.st_mode) else None

    async def get(self, key: str) -> Content | None:
        try:
            fd = os.open(f"{self._root}/{key}", os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            st = os.fstat(fd)
            if not st_mode.S_ISREG(st.st_mode):
                return None
            data = os.read(fd, st.st_size + 1)  # the whole file in one read, as a rule
            if len(data) != st.st_size:  # a short read: read on to the end
                parts = [data]
                while chunk := os.read(fd, READ_CHUNK):
                    parts.append(chunk)
                data = b"".join(parts)
            return _new(Content, (data, st.st_mtime))
        finally:
            os.close(fd)

    async def put(self, key: str, data: bytes) -> None:
        """Unchanged bytes only get a new mtime (a confirmed tag); a change is written to a
        temp file, fsynced, renamed into place and its directory fsynced, in a thread."""
        current = await self.get(key)
        path = f"{self._root}/{key}"
        if current is not None and current.data == data:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
            return
        await asyncio.get_running_loop().run_in_executor(None, self._write, path, data)

    def _write(self, path: str, data: bytes) -> None:
        blob = BlobWriter(self._tmp, final=lambda _digest: path)
        try:
            blob.write(data)
            blob.publish(blob.digest())
        except BaseException:
            blob.abort()
            raise

    async def mark(self, key: str) -> None:
        path = f"{self._root}/{key}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the repository's first link of its kind
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)

    async def read(self, key: str, start: int = 0, end: int | None = None
                   ) -> AsyncIterator[bytes]:
        fd = os.open(f"{self._root}/{key}", os.O_RDONLY)
        try:
            pos = start
            while end is None or pos < end:
                chunk = os.pread(fd, READ_CHUNK if end is None else min(READ_CHUNK, end - pos),
                                 pos)
                if not chunk:
                    return
                pos += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def writer(self, key: str, algorithm: str = "sha256", *, verify: bool = True
               ) -> FileWriter:
        path = f"{self._root}/{key}"
        return FileWriter(BlobWriter(self._tmp, algorithm, final=lambda _digest: path), verify)

    async def publish_file(self, path: Path, key: str, digest: Digest, size: int) -> None:
        """fsync the file, rename it into place, fsync the directory (in a thread)."""
        await asyncio.get_running_loop().run_in_executor(None, self._publish, path,
                                                         f"{self._root}/{key}")

    @staticmethod
    def _publish(path: Path, final: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        replace(path, final)
        fsync_dir(os.path.dirname(final))

    async def list(self, prefix: str) -> list[str]:
        try:
            return os.listdir(f"{self._root}/{prefix}")
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def walk(self, prefix: str, *, prune: Callable[[str], bool] | None = None,
                   last_use: bool = False) -> AsyncIterator[tuple[str, FileInfo | None]]:
        top = f"{self._root}/{prefix}"
        for dirpath, dirnames, filenames in os.walk(top):
            base = prefix + dirpath[len(top):]
            entered = []
            for name in dirnames:
                key = f"{base}/{name}"
                yield key, None
                if prune is None or not prune(key):
                    entered.append(name)
            dirnames[:] = entered  # (before os.walk goes on)
            for name in filenames:
                try:
                    st = os.stat(f"{dirpath}/{name}")
                except FileNotFoundError:
                    continue
                yield f"{base}/{name}", FileInfo(st.st_size, st.st_mtime)

    async def move(self, src: str, dst: str) -> None:
        source = f"{self._root}/{src}"
        if not os.path.isdir(source):
            return
        self._merge(source, f"{self._root}/{dst}")
        top = f"{self._root}/{src.partition('/')[0]}"
        parent = os.path.dirname(source)
        while len(parent) > len(top):
            try:
                os.rmdir(parent)
            except OSError:  # not empty: something else lives there
                break
            parent = os.path.dirname(parent)

    @classmethod
    def _merge(cls, src: str, dst: str) -> None:
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
            return
        for entry in list(os.scandir(src)):
            target = f"{dst}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                cls._merge(entry.path, target)
            elif not os.path.exists(target):
                os.rename(entry.path, target)
            else:
                os.unlink(entry.path)
        os.rmdir(src)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._root}/{key}")

    async def touch(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(f"{self._root}/{key}")

    async def url(self, key: str) -> str | None:
        return None

    async def check(self) -> str | None:
        return None  # /readyz probes the local disk by writing to it (Staging.probe_writable)

    async def purge_incomplete(self, older_than: float) -> int:
        """Nothing to do: ``tmp/`` is cleaned at start-up (Staging.clean_tmp)."""
        return 0


class FileWriter:
    """:class:`~proxy.storage.driver.base.ObjectWriter` onto a local temp file."""

    def __init__(self, blob: BlobWriter, verify: bool) -> None:
        self._blob = blob
        self._verify = verify

    @property
    def path(self) -> Path:
        """The temp file being written."""
        return self._blob.path

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._blob.write(memoryview(data))

    async def commit(self, expected: Digest, expected_size: int | None = None) -> None:
        try:
            if self._verify:
                self._blob.verify(expected, expected_size)
            elif expected_size is not None and self._blob.size != expected_size:
                raise SizeInvalid(f"got {self._blob.size} bytes, expected {expected_size}")
            await asyncio.get_running_loop().run_in_executor(None, self._blob.publish, expected)
        except BaseException:
            self._blob.abort()
            raise

    async def abort(self) -> None:
        self._blob.abort()
