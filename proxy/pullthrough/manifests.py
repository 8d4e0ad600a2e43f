"""Manifests of cached repositories: read from memory or the store, asked of the upstream
(``HEAD``, or ``GET``, verified and stored byte for byte)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from proxy.errors import BadGateway, ManifestUnknown, RegistryError
from proxy.mediatypes import GENERIC_TYPES, UPSTREAM_ACCEPT, sniff_media_type
from proxy.pullthrough.lru import ManifestLRU
from proxy.reference import Digest
from proxy.results import CacheOutcome, ManifestResult
from proxy.routing import Route
from proxy.storage import Store, StoredManifest
from proxy.storage.links import RepositoryLinks
from proxy.upstream import Endpoint, read_capped, upstream_error

if TYPE_CHECKING:
    from aiohttp import ClientResponse

log = logging.getLogger("regproxy.pullthrough")


class Manifests:
    """Stored manifests (the hot ones also in memory, up to ``memory`` bytes) and the
    upstream requests that fill them."""

    def __init__(self, store: Store, links: RepositoryLinks, *, max_manifest_size: int,
                 memory: int) -> None:
        self._store = store
        self._links = links
        self.max_manifest_size = max_manifest_size
        self._memory = ManifestLRU(memory)

    def in_memory(self, digest: Digest) -> StoredManifest | None:
        """A manifest this process holds in memory (no I/O: the hot path)."""
        return self._memory.get(str(digest))

    async def local(self, digest: Digest) -> StoredManifest | None:
        """A stored manifest by digest, from memory when hot."""
        key = str(digest)
        item = self._memory.get(key)
        if item is None:
            item = await self._store.get_manifest(digest)
            if item is not None:
                self._memory.put(item)
        return item

    def forget(self, digests: list[Digest] | None = None) -> None:
        """Drop ``digests`` (evicted) from memory, or everything (the store was purged)."""
        if digests is None:
            self._memory.clear()
            return
        for digest in digests:
            self._memory.discard(str(digest))

    async def head(self, route: Route, ref: str, expect: Digest | None) -> ManifestResult:
        """What the upstream says ``ref`` is, without its body when the answer's headers
        tell enough (else it is fetched: some registries omit the digest)."""
        async with _ask(route, "HEAD", ref) as resp:
            header = resp.headers.get("Docker-Content-Digest")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            size = resp.content_length
        if header is None or size is None or not media_type:
            return await self.fetch(route, ref, expect)
        digest = _digest_header(route, header)
        if expect is not None and digest != expect:
            raise BadGateway(f"upstream {route.upstream_client.name} answered {digest} for {expect}")
        return ManifestResult(digest, media_type, size, None, CacheOutcome.MISS)

    async def fetch(self, route: Route, ref: str, expect: Digest | None) -> ManifestResult:
        """GET a manifest upstream, verify it, store it byte for byte and link it."""
        upstream = route.upstream_client
        async with _ask(route, "GET", ref) as resp:
            if (resp.content_length or 0) > self.max_manifest_size:
                raise BadGateway(f"upstream manifest exceeds {self.max_manifest_size} bytes")
            data = await read_capped(resp, self.max_manifest_size)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header = resp.headers.get("Docker-Content-Digest")
        if media_type in GENERIC_TYPES:
            media_type = sniff_media_type(data) or media_type or "application/json"
        if expect is None and header is not None:
            expect = _digest_header(route, header)
        digest = Digest.of(data, expect.algorithm if expect else "sha256")
        if expect is not None and digest != expect:
            log.error("upstream %s sent manifest %s for %s (expected %s)", upstream.name,
                      digest, ref, expect)
            raise BadGateway(f"upstream manifest digest {digest} does not match {expect}")
        item = StoredManifest(digest, media_type, data)
        await self._store.put_manifest(item.digest, item.data, item.media_type)
        await self._links.add_manifest(route.key, item)
        self._memory.put(item)
        return ManifestResult.of(item, CacheOutcome.MISS)


@contextlib.asynccontextmanager
async def _ask(route: Route, method: str, ref: str) -> AsyncIterator[ClientResponse]:
    """The upstream's 200 answer to ``method`` on manifest ``ref`` (else its error)."""
    upstream = route.upstream_client
    async with upstream.request(method, route.remote, Endpoint.MANIFESTS, ref,
                                headers={"Accept": UPSTREAM_ACCEPT}) as resp:
        if resp.status != 200:
            raise upstream_error(resp, upstream, f"manifest {route.remote}:{ref}",
                                 ManifestUnknown)
        yield resp


def _digest_header(route: Route, header: str) -> Digest:
    """The upstream's ``Docker-Content-Digest``; a malformed one is a bad gateway."""
    try:
        return Digest.parse(header)
    except RegistryError:
        raise BadGateway(f"upstream {route.upstream_client.name} sent a bad digest header"
                         ) from None
