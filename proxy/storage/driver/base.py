"""What a storage backend offers: a few operations on bytes under keys.

Everything a registry means by its bytes (digests, manifests, tags, links, the catalog) is
written once above the drivers, in :mod:`proxy.storage.registry`; a new backend (GCS,
Azure) implements only this protocol and passes the contract suite in
``tests/storage/driver_contract.py``. The model is distribution's
``registry/storage/driver``, with what a pull-through cache adds: a local path to
``sendfile`` from, a verifying writer, a verified local file published by rename, and a
record of last use (LRU eviction, GC's grace period).

Keys are relative to the store's root and ``/``-separated (``blobs/sha256/ab/ab12...``,
``repositories/docker.io/library/alpine/_tags/latest``); a *directory* is a key's prefix.
They are built only from validated digests and repository names, never from raw client
text, so drivers take them as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NamedTuple, Protocol

from proxy.reference import Digest


class FileInfo(NamedTuple):
    """An object's size and modification time (seconds since the epoch)."""

    size: int
    mtime: float


class Content(NamedTuple):
    """A small object's bytes and modification time."""

    data: bytes
    mtime: float


class ObjectWriter(Protocol):
    """Streams one object to its key: ``commit`` verifies the digest (unless the writer was
    made with ``verify=False``) and the size, and only then makes the object visible, at
    once; ``abort`` leaves nothing behind. A fill streams into one besides its local temp
    file on drivers whose objects are not local files."""

    async def write(self, data: bytes | bytearray | memoryview) -> None: ...
    async def commit(self, expected: Digest, expected_size: int | None = None) -> None: ...
    async def abort(self) -> None: ...


class StorageDriver(Protocol):
    """Bytes under keys. An absent key is ``None`` (or nothing), never an error; other
    failures (a full disk, an unreachable bucket) raise."""

    #: Whether objects are files on this host (``local_path`` answers for every key).
    local: bool

    async def stat(self, key: str, *, last_use: bool = False) -> FileInfo | None:
        """Size and mtime of the object at ``key`` (a directory is no object). With
        ``last_use``, ``mtime`` is the later of the last write and the last :meth:`touch`
        (which a driver that cannot set an mtime records apart)."""

    async def get(self, key: str) -> Content | None:
        """A small object's bytes, read whole."""

    async def put(self, key: str, data: bytes) -> None:
        """Replace the object at ``key`` atomically (readers see the old or the new bytes)
        and durably. A put of the bytes the key already holds may just refresh its mtime."""

    async def mark(self, key: str) -> None:
        """Create an empty object at ``key`` unless there is one (a link or a marker: not
        synced, as losing one in a crash is harmless)."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the object at ``key`` (to its end if ``end`` is
        ``None``; nothing past it). ``FileNotFoundError`` when it is absent."""

    def local_path(self, key: str) -> str | None:
        """The file holding ``key``'s bytes (to ``sendfile`` from), on a :attr:`local`
        driver; ``None`` elsewhere. A plain string: this is on every blob request's path."""

    def writer(self, key: str, algorithm: str = "sha256", *, verify: bool = True
               ) -> ObjectWriter:
        """A writer of a new object at ``key``. ``verify=False``: the caller hashes the same
        bytes itself (a fill's temp file does), so ``commit`` checks only the size."""

    async def publish_file(self, path: Path, key: str, digest: Digest, size: int) -> None:
        """Make a local file whose digest the caller verified the object at ``key`` (a
        finished upload): renamed into place where the driver is :attr:`local` (the file is
        gone then), else uploaded (the caller removes what is left)."""

    async def list(self, prefix: str) -> list[str]:
        """Names of the entries (objects and directories) directly under ``prefix``, in no
        particular order; ``[]`` when there are none."""

    def walk(self, prefix: str, *, prune: Callable[[str], bool] | None = None,
             last_use: bool = False) -> AsyncIterator[tuple[str, FileInfo | None]]:
        """Every directory (``(key, None)``) and object (``(key, info)``) below ``prefix``,
        a directory before what is in it, in no particular order otherwise. A directory
        for which ``prune(key)`` is true is yielded but not entered. ``last_use``: as for
        :meth:`stat`."""

    async def move(self, src: str, dst: str) -> None:
        """Move every object below the directory ``src`` to the same place below ``dst``;
        where ``dst`` already has one, it wins and ``src``'s goes. Directories left empty
        go too, up to (not including) the top-level one."""

    async def delete(self, key: str) -> None:
        """Remove the object at ``key`` if there is one."""

    async def touch(self, key: str) -> None:
        """Record a use of the object at ``key`` now (nothing if it is absent); may finish
        in the background (a hit must not wait for it)."""

    async def url(self, key: str) -> str | None:
        """A URL clients may GET the object from directly (presigned), when the driver is
        configured to hand them out."""

    async def check(self) -> str | None:
        """``None`` when the backend answers, else what is wrong (for ``/readyz``)."""

    async def purge_incomplete(self, older_than: float) -> int:
        """Remove writes abandoned before ``older_than`` (a killed process's uploads);
        returns how many."""
