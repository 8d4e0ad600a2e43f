"""Repository semantics, written once over any storage driver: :class:`RegistryStore`
implements :class:`~proxy.storage.base.Store` on a
:class:`~proxy.storage.driver.base.StorageDriver`.

Keys (the same on every backend; docs/architecture.md, "On-disk layout")::

    blobs/<alg>/<hex[:2]>/<hex>                  bytes of every blob and manifest, stored once
    manifests/<alg>/<hex[:2]>/<hex>              media type of a stored manifest (bytes in blobs/)
    repositories/<name>/_tags/<tag>              digest that <tag> last pointed to
    repositories/<name>/_manifests/<alg>/<hex>   link: <name> holds this manifest
    repositories/<name>/_layers/<alg>/<hex>      link: <name> holds this blob
    repositories/<name>/_referrers/<alg>/<subject-hex>/<alg>-<hex>
                                                 marker: manifest <hex> has <subject> as subject
    layout                                       the layout's version (see proxy.layout)
    purged                                       changed by every ``regproxy cache purge``

Repository name components cannot start with ``_`` (see :mod:`proxy.reference`), so
``_tags`` and ``_manifests`` never collide with a nested repository.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Generic, TypeVar

from proxy.errors import DigestInvalid
from proxy.reference import Digest
from proxy.storage.base import BlobStat, StoredManifest
from proxy.storage.driver.base import ObjectWriter, StorageDriver

D = TypeVar("D", bound=StorageDriver)

_TAGS = "_tags"
_MANIFESTS = "_manifests"
_LAYERS = "_layers"
_REFERRERS = "_referrers"
#: What makes a directory a repository (``_referrers`` alone does not).
_HOLDINGS = (_TAGS, _MANIFESTS, _LAYERS)


def blob_key(digest: Digest) -> str:
    """Where an object's bytes live."""
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def media_type_key(digest: Digest) -> str:
    """Where a stored manifest's media type lives (its presence makes it a manifest)."""
    return f"manifests/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def _link_key(name: str, kind: str, digest: Digest) -> str:
    return f"repositories/{name}/{kind}/{digest.algorithm}/{digest.hex}"


def _referrers_key(name: str, subject: Digest) -> str:
    return f"repositories/{name}/{_REFERRERS}/{subject.algorithm}/{subject.hex}"


def _internal(key: str) -> bool:
    """A directory below a repository that is no nested repository (``_tags`` ...)."""
    return key.rpartition("/")[2].startswith("_")


class RegistryStore(Generic[D]):
    """Content-addressed objects, manifests, tags and repository links on ``driver``."""

    def __init__(self, driver: D) -> None:
        self.driver = driver
        self.local = driver.local

    async def check(self) -> str | None:
        return await self.driver.check()

    async def purge_incomplete(self, older_than: float) -> int:
        return await self.driver.purge_incomplete(older_than)

    # -- objects -----------------------------------------------------------------------

    async def blob_size(self, digest: Digest) -> int | None:
        info = await self.driver.stat(f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}")
        return None if info is None else info.size

    def local_path(self, digest: Digest) -> str | None:
        return self.driver.local_path(f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}")

    def open_blob(self, digest: Digest, start: int = 0, end: int | None = None
                  ) -> AsyncIterator[bytes]:
        return self.driver.read(blob_key(digest), start, end)

    async def redirect_url(self, digest: Digest) -> str | None:
        return await self.driver.url(blob_key(digest))

    def fill_sink(self, digest: Digest) -> ObjectWriter | None:
        """``None`` on a local driver: the fill's temp file is renamed into place
        (:meth:`BlobWriter.publish <proxy.storage.localfs.BlobWriter.publish>`)."""
        if self.local:
            return None
        return self.driver.writer(blob_key(digest), digest.algorithm, verify=False)

    async def import_file(self, path: Path, digest: Digest, size: int) -> None:
        key = blob_key(digest)
        stored = await self.driver.stat(key)
        if stored is not None and stored.size == size:
            await self.driver.touch(key)  # already stored: keep it, refresh it for GC
            return
        await self.driver.publish_file(path, key, digest, size)

    async def put_small(self, digest: Digest, data: bytes) -> None:
        """Store a small object (a manifest) after checking its digest."""
        if Digest.of(data, digest.algorithm) != digest:
            raise DigestInvalid(f"content digest does not match {digest}")
        key = blob_key(digest)
        stored = await self.driver.stat(key)
        if stored is None or stored.size != len(data):
            await self.driver.put(key, data)

    async def touch_blob(self, digest: Digest) -> None:
        await self.driver.touch(blob_key(digest))

    async def blob_last_used(self, digest: Digest) -> float | None:
        info = await self.driver.stat(blob_key(digest), last_use=True)
        return None if info is None else info.mtime

    async def delete_blob(self, digest: Digest, *, older_than: float | None = None) -> bool:
        """Remove an object (and a manifest's media type); with ``older_than``, only if it
        was not used since (checked right before, so a revived object stays)."""
        key = blob_key(digest)
        stored = await self.driver.stat(key, last_use=older_than is not None)
        if stored is None or (older_than is not None and stored.mtime >= older_than):
            return False
        await self.driver.delete(media_type_key(digest))
        await self.driver.delete(key)
        return True

    async def blob_stats(self) -> AsyncIterator[BlobStat]:
        async for key, info in self.driver.walk("blobs", last_use=True):
            parts = key.split("/")
            if info is not None and len(parts) == 4:
                yield BlobStat(Digest(parts[1], parts[3]), info.size, info.mtime)

    # -- manifests ---------------------------------------------------------------------

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """The bytes first (verified), then the media type, which makes it visible."""
        await self.put_small(digest, data)
        await self.driver.put(media_type_key(digest), media_type.encode())

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        media = await self.driver.get(media_type_key(digest))
        if media is None:
            return None
        body = await self.driver.get(blob_key(digest))
        if body is None:
            return None
        return StoredManifest(digest, media.data.decode(), body.data)

    async def has_manifest(self, digest: Digest) -> bool:
        return await self.driver.stat(media_type_key(digest)) is not None

    # -- repositories ------------------------------------------------------------------

    async def _remove(self, key: str) -> bool:
        if await self.driver.stat(key) is None:
            return False
        await self.driver.delete(key)
        return True

    async def _list_links(self, name: str, kind: str) -> list[Digest]:
        base = f"repositories/{name}/{kind}"
        out = []
        async for key, info in self.driver.walk(base):
            alg, _, hexpart = key[len(base) + 1:].partition("/")
            if info is not None and hexpart:
                out.append(Digest(alg, hexpart))
        return out

    async def link_manifest(self, name: str, digest: Digest) -> None:
        await self.driver.mark(_link_key(name, _MANIFESTS, digest))

    async def has_manifest_link(self, name: str, digest: Digest) -> bool:
        return await self.driver.stat(_link_key(name, _MANIFESTS, digest)) is not None

    async def unlink_manifest(self, name: str, digest: Digest) -> bool:
        """Remove ``digest`` (and every tag pointing at it) from ``name``; True if it was there."""
        if not await self._remove(_link_key(name, _MANIFESTS, digest)):
            return False
        for tag in await self.list_tags(name) or []:
            if await self.get_tag(name, tag) == digest:
                await self.delete_tag(name, tag)
        return True

    async def list_manifest_links(self, name: str) -> list[Digest]:
        return await self._list_links(name, _MANIFESTS)

    async def link_blob(self, name: str, digest: Digest) -> None:
        await self.driver.mark(_link_key(name, _LAYERS, digest))

    async def has_blob_link(self, name: str, digest: Digest) -> bool:
        return await self.driver.stat(_link_key(name, _LAYERS, digest)) is not None

    async def unlink_blob(self, name: str, digest: Digest) -> bool:
        return await self._remove(_link_key(name, _LAYERS, digest))

    async def list_blob_links(self, name: str) -> list[Digest]:
        return await self._list_links(name, _LAYERS)

    async def add_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        await self.driver.mark(
            f"{_referrers_key(name, subject)}/{digest.algorithm}-{digest.hex}")

    async def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        await self.driver.delete(
            f"{_referrers_key(name, subject)}/{digest.algorithm}-{digest.hex}")

    async def list_referrers(self, name: str, subject: Digest) -> list[Digest]:
        entries = await self.driver.list(_referrers_key(name, subject))
        return sorted((Digest(*e.split("-", 1)) for e in entries if "-" in e), key=str)

    # -- tags --------------------------------------------------------------------------

    async def set_tag(self, name: str, tag: str, digest: Digest, *, confirmed: bool = False
                      ) -> None:
        """Point ``tag`` at ``digest``. ``confirmed``: the upstream just confirmed it, so the
        tag's mtime (the time of the last confirmation, which replicas share) is refreshed
        even if it is unchanged."""
        key = f"repositories/{name}/{_TAGS}/{tag}"
        value = str(digest).encode()
        if not confirmed:
            current = await self.driver.get(key)
            if current is not None and current.data == value:
                return
        await self.driver.put(key, value)

    async def tag_with_age(self, name: str, tag: str) -> tuple[Digest | None, float]:
        """A tag's digest and the seconds since it was last written or confirmed."""
        got = await self.driver.get(f"repositories/{name}/{_TAGS}/{tag}")
        if got is None:
            return None, 0.0
        try:
            return Digest.parse(got.data.decode().strip()), max(0.0, time.time() - got.mtime)
        except Exception:  # a damaged link is treated as absent, never as a 500
            return None, 0.0

    async def get_tag(self, name: str, tag: str) -> Digest | None:
        got = await self.driver.get(f"repositories/{name}/{_TAGS}/{tag}")
        if got is None:
            return None
        try:
            return Digest.parse(got.data.decode().strip())
        except Exception:  # a damaged link is treated as absent, never as a 500
            return None

    async def delete_tag(self, name: str, tag: str) -> bool:
        return await self._remove(f"repositories/{name}/{_TAGS}/{tag}")

    async def list_tags(self, name: str) -> list[str] | None:
        """Sorted tags of ``name``, or ``None`` when the repository does not exist."""
        tags = await self.driver.list(f"repositories/{name}/{_TAGS}")
        if tags:
            return sorted(tags)
        held = await self.driver.list(f"repositories/{name}")
        return [] if any(kind in held for kind in _HOLDINGS) else None

    # -- the catalog -------------------------------------------------------------------

    async def list_repositories(self) -> list[str]:
        """Sorted names of every repository holding a tag or a link."""
        names = set()
        async for key, info in self.driver.walk("repositories", prune=_internal):
            parent, _, base = key.rpartition("/")
            if info is None and base in _HOLDINGS:
                names.add(parent[len("repositories/"):])
        return sorted(names)

    async def rename_repository(self, old: str, new: str) -> None:
        """Move ``old``'s tags, links and referrers under ``new`` (entries already there
        win); nested repositories under ``old`` stay where they are."""
        for kind in (*_HOLDINGS, _REFERRERS):
            await self.driver.move(f"repositories/{old}/{kind}", f"repositories/{new}/{kind}")

    # -- layout and purges -------------------------------------------------------------

    async def layout_version(self) -> int | None:
        got = await self.driver.get("layout")
        with contextlib.suppress(ValueError):
            return None if got is None else int(got.data.decode().strip())
        return None

    async def set_layout_version(self, version: int) -> None:
        await self.driver.put("layout", f"{version}\n".encode())

    async def purge_marker(self) -> str | None:
        got = await self.driver.get("purged")
        return None if got is None else got.data.decode(errors="replace").strip()

    async def mark_purge(self) -> None:
        await self.driver.put("purged", f"{secrets.token_hex(8)}\n".encode())
