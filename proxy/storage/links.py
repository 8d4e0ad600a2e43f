"""Which objects a cached repository holds: the links that scope its reads.

The store is one content-addressed pool shared by every repository, hosted and cached;
a cached repository may serve an object only when its upstream vouched for it under that
repository's name: it served the manifest or blob for that name, a manifest of that
repository references it, or a ``HEAD`` for that name confirmed it. Each such fact is a
link in the store (written once) and, for the hot path, an entry in this process's memory.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

from proxy.mediatypes import references
from proxy.reference import Digest
from proxy.storage.base import Store, StoredManifest


class RepositoryLinks:
    """Links of cached repositories (by storage key), remembered up to ``capacity``."""

    def __init__(self, store: Store, capacity: int = 200_000) -> None:
        self._store = store
        self._capacity = capacity
        self._known: OrderedDict[tuple[str, Digest], None] = OrderedDict()

    def forget(self) -> None:
        """Drop what this process remembers (the store was changed behind its back)."""
        self._known.clear()

    def known(self, key: str, digest: Digest) -> bool:
        """Whether this process already knows ``key`` holds ``digest`` (no I/O)."""
        return (key, digest) in self._known

    async def holds_manifest(self, key: str, digest: Digest) -> bool:
        if self.known(key, digest):
            return True
        if await self._store.has_manifest_link(key, digest):
            self._remember(key, digest)
            return True
        return False

    async def holds_blob(self, key: str, digest: Digest) -> bool:
        """A blob, or a manifest fetched through the blob endpoint (containerd does)."""
        if self.known(key, digest):
            return True
        if (await self._store.has_blob_link(key, digest)
                or await self._store.has_manifest_link(key, digest)):
            self._remember(key, digest)
            return True
        return False

    async def add_blob(self, key: str, digest: Digest) -> None:
        if not self.known(key, digest):
            await self._store.link_blob(key, digest)
            self._remember(key, digest)

    async def add_manifest(self, key: str, item: StoredManifest, *, stored_too: bool = False
                           ) -> None:
        """Link a manifest the upstream served or confirmed for ``key``, and what it
        references: an index's child manifests, an image's config and layers.

        References already in the pool are left to a ``HEAD`` for ``key`` on first use
        (``stored_too`` links them as well: the layout upgrade, for what layout 1 served
        anyway): otherwise a manifest that names a digest it does not hold (a foreign
        layer, an index child some registries do not check) would unlock that object,
        pushed privately to a hosted repository, say. Foreign layers are never linked."""
        if self.known(key, item.digest):
            return
        children, blobs = references(_parse(item.data), distributable=True)
        refs = [*children, *blobs]
        if not stored_too:
            sizes = await asyncio.gather(*(self._store.blob_size(d) for d in refs))
            refs = [d for d, size in zip(refs, sizes, strict=True) if size is None]
        wanted = set(refs)
        await asyncio.gather(*(self._store.link_manifest(key, d) for d in children if d in wanted),
                             *(self._store.link_blob(key, d) for d in blobs if d in wanted))
        await self._store.link_manifest(key, item.digest)  # last: it marks the set complete
        for d in (*refs, item.digest):
            self._remember(key, d)

    def _remember(self, key: str, digest: Digest) -> None:
        self._known[(key, digest)] = None
        if len(self._known) > self._capacity:
            self._known.popitem(last=False)


def _parse(data: bytes) -> object:
    """A manifest's JSON, or ``None`` when it does not parse (it then references nothing)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None
