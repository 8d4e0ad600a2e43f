"""What the services get from storage: the :class:`Store` protocol.

One class implements it, :class:`~proxy.storage.registry.RegistryStore`, over a storage
driver (:mod:`proxy.storage.driver`): the filesystem (the default, one host or a shared
POSIX filesystem) or S3-compatible object storage (for several replicas). Services only
``await`` these methods, so they run unchanged on either. A fill tees into a local temp
file of the staging area (:mod:`proxy.storage.staging`) on both; where objects are not
local files it also streams into the driver's writer (:meth:`Store.fill_sink`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proxy.reference import Digest
from proxy.storage.driver.base import ObjectWriter


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest as stored: its exact bytes and the media type it was served with."""

    digest: Digest
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class BlobStat:
    """A stored object's size and last use (seconds since the epoch)."""

    digest: Digest
    size: int
    last_used: float


class Store(Protocol):
    """Content-addressed objects, manifests, tags and repository links."""

    #: Whether objects are files on this host (a GC or eviction pass is then cheap
    #: syscalls, best run in a thread; an object store's uses this loop's connections).
    local: bool

    async def purge_incomplete(self, older_than: float) -> int:
        """Remove writes abandoned before ``older_than`` (a killed process's temp data)."""

    async def check(self) -> str | None:
        """``None`` when the backend answers, else what is wrong (for ``/readyz``)."""

    # -- objects (blobs and manifest bytes) --------------------------------------------
    async def blob_size(self, digest: Digest) -> int | None:
        """Size of a stored object, ``None`` when absent."""

    def local_path(self, digest: Digest) -> str | None:
        """A local file to ``sendfile`` the object from, when the backend has one."""

    def open_blob(self, digest: Digest, start: int = 0, end: int | None = None
                  ) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of a stored object (backends without a local path)."""

    async def redirect_url(self, digest: Digest) -> str | None:
        """A URL clients may fetch the object from directly (presigned), if configured."""

    def fill_sink(self, digest: Digest) -> ObjectWriter | None:
        """Where an upstream fill streams besides its local temp file (``None``: the temp
        file itself becomes the object)."""

    async def import_file(self, path: Path, digest: Digest, size: int) -> None:
        """Publish a local file whose digest was verified (a finished upload)."""

    async def touch_blob(self, digest: Digest) -> None:
        """Record a use (LRU eviction; GC's grace period protects revived objects)."""

    async def blob_last_used(self, digest: Digest) -> float | None:
        """An object's last use as :meth:`touch_blob` records it (the console); None if absent."""

    async def delete_blob(self, digest: Digest, *, older_than: float | None = None) -> bool:
        """Remove an object unless used since ``older_than``; True if it went."""

    def blob_stats(self) -> AsyncIterator[BlobStat]:
        """Every stored object (GC, eviction)."""

    # -- manifests ---------------------------------------------------------------------
    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None: ...
    async def get_manifest(self, digest: Digest) -> StoredManifest | None: ...
    async def has_manifest(self, digest: Digest) -> bool: ...

    # -- repositories ------------------------------------------------------------------
    async def link_manifest(self, name: str, digest: Digest) -> None: ...
    async def has_manifest_link(self, name: str, digest: Digest) -> bool: ...
    async def unlink_manifest(self, name: str, digest: Digest) -> bool: ...
    async def list_manifest_links(self, name: str) -> list[Digest]: ...
    async def link_blob(self, name: str, digest: Digest) -> None: ...
    async def has_blob_link(self, name: str, digest: Digest) -> bool: ...
    async def unlink_blob(self, name: str, digest: Digest) -> bool: ...
    async def list_blob_links(self, name: str) -> list[Digest]: ...
    async def add_referrer(self, name: str, subject: Digest, digest: Digest) -> None: ...
    async def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None: ...
    async def list_referrers(self, name: str, subject: Digest) -> list[Digest]: ...
    async def set_tag(self, name: str, tag: str, digest: Digest, *, confirmed: bool = False
                      ) -> None: ...
    async def get_tag(self, name: str, tag: str) -> Digest | None: ...
    async def tag_with_age(self, name: str, tag: str) -> tuple[Digest | None, float]: ...
    async def delete_tag(self, name: str, tag: str) -> bool: ...
    async def list_tags(self, name: str) -> list[str] | None: ...
    async def list_repositories(self) -> list[str]: ...
    async def rename_repository(self, old: str, new: str) -> None:
        """Move a repository's tags and links to another key (merging into what is there);
        nested repositories under ``old`` stay where they are."""

    # -- layout ------------------------------------------------------------------------
    async def layout_version(self) -> int | None:
        """The recorded layout version; ``None`` if none is (a store older than version 2,
        or a new one)."""

    async def set_layout_version(self, version: int) -> None: ...

    # -- purges ------------------------------------------------------------------------
    async def purge_marker(self) -> str | None:
        """A token that changes whenever ``regproxy cache purge`` removed something: running
        processes compare it (about once a second) and drop what they hold in memory."""

    async def mark_purge(self) -> None:
        """Change :meth:`purge_marker` (after a purge)."""
