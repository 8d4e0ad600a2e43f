"""The pull-through service: answers manifest, blob and tag reads for cached repositories.

Data flows one way: handlers call this service, which reads the store and, on a miss,
the upstream. Its parts each have one job: :mod:`~proxy.pullthrough.tags` (how long a tag
is trusted, and its revalidation), :mod:`~proxy.pullthrough.manifests` (stored manifests
and their upstream requests), :mod:`~proxy.pullthrough.fills` (single flight of blob
downloads, given at wiring), :mod:`~proxy.storage.links` (what a repository may
serve) and :mod:`~proxy.pullthrough.recency` (uses, for eviction). Manifests by digest
are immutable and kept forever.

Every read first asks the upstream's allow/deny rules (:func:`check_rules`), before the
memory, the store or the upstream: a denied repository or tag is ``DENIED`` whether or not
it is cached, so a rule added later also stops serving what was fetched before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any

from proxy.bounded import BoundedDict
from proxy.errors import (
    BadGateway,
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unavailable,
)
from proxy.mediatypes import (
    IMAGE_MANIFESTS,
    INDEXES,
    PUSHABLE,
    accepts,
    platform_child,
    references,
)
from proxy.policy.limits import UpstreamBusy
from proxy.pullthrough.coordination import Coordination, HostLock, from_peer
from proxy.pullthrough.fills import Fills
from proxy.pullthrough.manifests import Manifests
from proxy.pullthrough.prefetch import Prefetch
from proxy.pullthrough.recency import Recency
from proxy.pullthrough.referrers import Referrers
from proxy.pullthrough.signatures import Signatures
from proxy.pullthrough.tags import Tags, tag_key
from proxy.reference import Digest
from proxy.results import (
    HIT,
    BlobResult,
    CacheOutcome,
    FillingBlob,
    ManifestResult,
    StoredBlob,
    UpstreamHead,
    paginate,
)
from proxy.routing import Route
from proxy.settings.prefetch import PrefetchConfig
from proxy.sharedcache import SharedCache
from proxy.singleflight import SingleFlight
from proxy.storage import Store
from proxy.storage.links import RepositoryLinks
from proxy.untrusted import loads_json
from proxy.upstream import Endpoint, read_capped, upstream_error

log = logging.getLogger("regproxy.pullthrough")


@dataclass
class WarmProgress:
    """How far a :meth:`PullThrough.warm` got (read by the console while it runs)."""

    manifests: int = 0
    blobs: int = 0
    blobs_total: int | None = None
    #: read from fills by this warm (blobs already stored add nothing; one a prefetch
    #: finished first neither)
    bytes: int = 0


@dataclass(frozen=True)
class TagStatus:
    """What the console shows of a cached tag: its last revalidation and this worker's
    successful manifest GETs of it since start."""

    validated_at: float | None  #: unix time the upstream last confirmed it
    fresh: bool | None  #: confirmed within the TTL (None: no tag link)
    pulls: int


class PullThrough:
    """Reads of cached repositories, backed by the store, the upstreams and ``fills``."""

    def __init__(
        self,
        store: Store,
        fills: Fills,
        coordination: Coordination,
        tag_cache: SharedCache,
        host_lock: HostLock,
        *,
        tag_ttl: float,
        tag_grace: float = 0.0,
        max_manifest_size: int,
        manifest_memory: int,
        default_platform: tuple[str, str],
        prefetch: PrefetchConfig | None = None,
    ) -> None:
        self._store = store
        self._fills = fills
        self._coordination = coordination
        self.max_manifest_size = max_manifest_size
        self.default_platform = default_platform
        self.links = RepositoryLinks(store)
        self.recency = Recency(store)
        self._manifests = Manifests(store, self.links, max_manifest_size=max_manifest_size,
                                    memory=manifest_memory)
        self._tags = Tags(store, self._manifests, self.links, tag_cache, coordination, host_lock,
                          ttl=tag_ttl, grace=tag_grace)
        self._flight: SingleFlight[ManifestResult] = SingleFlight()  #: manifests by digest
        #: Successful manifest GETs by tag in this worker since start (the console;
        #: bounded: it may start over).
        self._pulls: BoundedDict[str, int] = BoundedDict(100_000)
        self._head_flight: SingleFlight[int] = SingleFlight()  #: per repository and object
        self._referrers = Referrers(
            store, tag_cache, ttl=tag_ttl,
            pull_digest=lambda route, digest: self._manifest_by_digest(route, digest, head=False),
            pull_tag=lambda route, tag: self._tags.resolve(route, tag, head=False))
        self._signatures = Signatures(
            store, refusal_ttl=tag_ttl,
            pull_tag=lambda route, tag: self._tags.resolve(route, tag, head=False),
            pull_blob=lambda route, digest: self.blob(route, digest, head=False))
        #: Fills the blobs of image manifests fetched for a GET (``None``: off).
        self._prefetch = (Prefetch(store, self.links, fills, prefetch, check=check_rules)
                          if prefetch is not None and prefetch.enabled else None)

    def forget(self, digests: list[Digest]) -> None:
        """Drop evicted objects from the in-memory caches of this process."""
        self._manifests.forget(digests)
        self.recency.forget(digests)

    async def watch_purges(self, interval: float = 1.0) -> None:
        """Every ``interval``, compare the store's purge marker (``regproxy cache purge``
        changes it); when it changed, drop the tags, manifests and links this process
        holds in memory, so nothing purged is served from memory (they are read again
        from the store, or the upstream)."""
        seen: str | None = None
        first = True
        while True:
            try:
                marker = await self._store.purge_marker()
            except Exception as exc:  # an object store that is down: try again later
                log.debug("cannot read the purge marker: %s", type(exc).__name__)
            else:
                if not first and marker != seen:
                    self._manifests.forget()
                    self.links.forget()
                    self._referrers.forget()
                    await self._tags.forget()
                    log.info("the store was purged: in-memory tags and manifests dropped")
                seen, first = marker, False
            await asyncio.sleep(interval)

    # -- manifests ---------------------------------------------------------------------

    async def manifest(
        self, route: Route, reference: str | Digest, accepted: AbstractSet[str], *, head: bool,
        count: bool = True,
    ) -> ManifestResult:
        """Resolve a manifest by tag or digest, filling the cache on a miss. A served tag
        GET counts as one of the tag's pulls unless ``count`` is false (a warm: no client)."""
        check_rules(route, reference)
        result = self._in_memory(route, reference, accepted)
        if result is None:
            if isinstance(reference, Digest):
                result = await self._manifest_by_digest(route, reference, head=head)
            else:
                result = await self._tags.resolve(route, reference, head=head)
                result = await self._negotiate(route, result, accepted, head=head)
        if route.upstream_client.config.require_signature is not None:
            await self._signatures.check(route, reference, result)
        if count and not head and not isinstance(reference, Digest):  # (a failed GET: no pull)
            key = tag_key(route.key, reference)
            self._pulls[key] = self._pulls.get(key, 0) + 1
        if (self._prefetch is not None and not head and result.outcome is CacheOutcome.MISS
                and result.data is not None and result.media_type in IMAGE_MANIFESTS):
            self._prefetch.image(route, result.data)  # (an index: its child, when asked)
        if result.data is not None and self.recency.due(result.digest):
            await self._store.touch_blob(result.digest)
        return result

    def _in_memory(self, route: Route, reference: str | Digest, accepted: AbstractSet[str]
                   ) -> ManifestResult | None:
        """The answer when this process holds everything it needs (a fresh tag, the
        manifest, a type the client takes): the hot path, with no awaits."""
        if isinstance(reference, Digest):
            digest: Digest | None = reference if self.links.known(route.key, reference) else None
        else:
            digest = self._tags.fresh_in_memory(route, reference)
        if digest is None:
            return None
        item = self._manifests.in_memory(digest)
        if item is None or (digest is not reference and not accepts(accepted, item.media_type)):
            return None
        return ManifestResult.of(item, HIT)

    async def _manifest_by_digest(self, route: Route, digest: Digest, *, head: bool
                                  ) -> ManifestResult:
        local = await self._manifests.local(digest)
        linked = await self.links.holds_manifest(route.key, digest)
        if local is not None:
            if not linked:
                await self._confirm(route, digest, manifest=True)
                await self.links.add_manifest(route.key, local)
            return ManifestResult.of(local, CacheOutcome.HIT)
        try:
            if head:
                return await self._manifests.head(route, str(digest), expect=digest)
            result, shared = await self._flight.do(  # per repository: it links the result
                ("manifest", route.key, str(digest)), lambda: self._fetch_by_digest(route, digest))
        except RegistryError as exc:
            if linked:
                raise
            raise _not_vouched(exc, route, digest, manifest=True) from None
        return replace(result, outcome=CacheOutcome.COALESCED if shared else result.outcome)

    async def _fetch_by_digest(self, route: Route, digest: Digest) -> ManifestResult:
        async def stored() -> ManifestResult | None:
            item = await self._manifests.local(digest)  # (the peer linked it: same repository)
            if item is None or not await self.links.holds_manifest(route.key, digest):
                return None
            return ManifestResult.of(item, CacheOutcome.COALESCED)

        peer = await from_peer(self._coordination, f"manifest:{route.key}@{digest}", stored)
        return peer if peer is not None else await self._manifests.fetch(route, str(digest), digest)

    async def _negotiate(self, route: Route, result: ManifestResult, accepted: AbstractSet[str], *,
                         head: bool) -> ManifestResult:
        """Serve what the client accepts; an index becomes its default-platform child for
        clients that only take image manifests (what Docker Hub does for old clients)."""
        if accepts(accepted, result.media_type):
            return result
        if result.media_type in INDEXES and result.data is not None and accepted & IMAGE_MANIFESTS:
            child = platform_child(result.data, *self.default_platform)
            if child is not None:
                resolved = await self._manifest_by_digest(route, Digest.parse(child), head=head)
                if accepts(accepted, resolved.media_type):
                    return resolved
        raise ManifestUnknown(
            f"manifest is {result.media_type}, which is not in the request's Accept header")

    async def revalidate_tag(self, route: Route, tag: str) -> ManifestResult:
        """Ask the upstream what ``tag`` is now, however fresh it is (an operator's
        "re-validate now"); the new digest is stored when it changed."""
        check_rules(route, tag)
        return await self._tags.revalidate_now(route, tag)

    async def tag_status(self, route: Route, tag: str) -> TagStatus:
        """A cached tag's last revalidation, freshness and pulls here (read-only)."""
        seen = await self._tags.validated_at(route, tag)
        return TagStatus(None if seen is None else seen[0], None if seen is None else seen[1],
                         self._pulls.get(tag_key(route.key, tag), 0))

    async def warm(self, route: Route, reference: str | Digest, progress: WarmProgress) -> None:
        """Fill the cache with an image as a pull would (``regproxy warm`` does it over
        HTTP): the manifest, the default platform's child of an index, then each config
        and layer blob, one at a time (a fill's bytes are read and dropped). ``progress``
        is updated as it goes, for whoever started it. It is no pull of the tag (the
        console's ``pulls`` count clients')."""
        result = await self.manifest(route, reference, PUSHABLE, head=False, count=False)
        progress.manifests += 1
        manifests = [result]
        if result.media_type in INDEXES and result.data is not None:
            child = platform_child(result.data, *self.default_platform)
            if child is None:
                raise ManifestUnknown(f"the index has no {'/'.join(self.default_platform)} image")
            manifests.append(await self.manifest(route, Digest.parse(child), PUSHABLE, head=False))
            progress.manifests += 1
        blobs: list[Digest] = []
        for item in manifests:
            if item.data is not None and item.media_type not in INDEXES:
                blobs += references(loads_json(item.data), distributable=True)[1]
        progress.blobs_total = len(blobs)
        for digest in blobs:
            found = await self.blob(route, digest, head=False)
            if isinstance(found, FillingBlob):
                try:
                    async for chunk in found.reader.stream():
                        progress.bytes += len(chunk)
                finally:
                    found.reader.close()
                await self._fills.wait_ended(digest)  # (published: a warm done is stored)
            progress.blobs += 1

    # -- blobs -------------------------------------------------------------------------

    async def blob(self, route: Route, digest: Digest, *, head: bool) -> BlobResult:
        """Find a blob of the repository: stored, being filled, or (GET) start a fill;
        HEAD asks upstream. A blob the repository holds no link to is first confirmed
        upstream for its name (a HEAD): the pool is shared by every repository."""
        check_rules(route, digest)
        if self._prefetch is not None and not head:
            self._prefetch.requested(digest)
        size = await self._store.blob_size(digest)
        linked = await self.links.holds_blob(route.key, digest)
        if size is not None and linked:
            await self.recency.touch(digest)
            return StoredBlob(digest, size, HIT)
        filling = self._fills.running_size(digest)
        if head and linked and filling is not None:
            return UpstreamHead(digest, filling, CacheOutcome.COALESCED)
        upstream_size: int | None = None  #: what the upstream's HEAD said, when it was asked
        if head or not linked:
            upstream_size, shared = await self._confirm(route, digest, manifest=False)
            await self.links.add_blob(route.key, digest)
            if size is not None:
                await self.recency.touch(digest)
                return StoredBlob(digest, size, CacheOutcome.HIT)
            if head:
                return UpstreamHead(digest, upstream_size,
                                    CacheOutcome.COALESCED if shared else CacheOutcome.MISS)
        return await self._fills.get(route, digest, size=upstream_size)  # (a big one: ranged)

    async def _confirm(self, route: Route, digest: Digest, *, manifest: bool) -> tuple[int, bool]:
        """Ask the upstream whether the repository holds ``digest`` (one HEAD per repository
        and object at a time): ``(size, shared)``. Whatever keeps it from saying yes (a 404,
        an outage) is a 404 here: an object the repository is not known to hold is never
        served, and the answer must not tell whether the pool has it."""
        kind = "manifest" if manifest else "blob"
        try:
            return await self._head_flight.do(
                (kind, route.key, str(digest)), lambda: self._head_object(route, digest, manifest))
        except UpstreamBusy:
            raise  # (our cap, a 503 to retry, whether or not the pool holds the object)
        except RegistryError as exc:
            raise _not_vouched(exc, route, digest, manifest=manifest) from None

    async def _head_object(self, route: Route, digest: Digest, manifest: bool) -> int:
        upstream = route.upstream_client
        if manifest:
            return (await self._manifests.head(route, str(digest), expect=digest)).size
        async with upstream.request("HEAD", route.remote, Endpoint.BLOBS, digest) as resp:
            if resp.status != 200:
                raise upstream_error(resp, upstream, f"blob {digest}", BlobUnknown)
            if resp.content_length is None:
                raise BadGateway(f"upstream {upstream.name} sent no Content-Length for {digest}")
            return resp.content_length

    async def close(self) -> None:
        """Cancel the upstream work in flight: revalidations, manifest and HEAD flights
        (they use the upstream session, closed next). The fills close on their own."""
        if self._prefetch is not None:
            await self._prefetch.close()
        upstream_work: list[asyncio.Future[Any]] = [
            *self._tags.running(), *self._flight.running(), *self._head_flight.running(),
            *self._referrers.running(), *self._signatures.running()]
        for work in upstream_work:
            work.cancel()
        if upstream_work:
            await asyncio.wait(upstream_work, timeout=5)

    async def referrers(self, route: Route, subject: Digest) -> list[dict[str, Any]]:
        """The descriptors of ``subject``'s referrers, from the upstream (its referrers API
        or referrers schema tag), pulled through (see :mod:`~proxy.pullthrough.referrers`)."""
        check_rules(route, subject)
        return await self._referrers.get(route, subject)

    # -- tags --------------------------------------------------------------------------

    async def tags(self, route: Route, n: int | None, last: str | None) -> tuple[list[str], bool]:
        """Tags from the upstream (paginated there); the stored ones if it is unreachable.

        Returns ``(tags, more)``.
        """
        check_rules(route, None)
        query = {}
        if n is not None:
            query["n"] = str(n)
        if last is not None:
            query["last"] = last
        try:
            async with route.upstream_client.request("GET", route.remote, Endpoint.TAGS,
                                                     query=query) as resp:
                if resp.status != 200:
                    raise upstream_error(resp, route.upstream_client, f"tags of {route.remote}",
                                         NameUnknown)
                raw = await read_capped(resp, self.max_manifest_size)
                more = 'rel="next"' in resp.headers.get("Link", "")
            doc = json.loads(raw)
            tags = [t for t in doc.get("tags") or [] if isinstance(t, str)]
            return tags, more
        except (Unavailable, TooManyRequests, BadGateway, NameUnknown, ValueError,
                AttributeError) as exc:
            local = await self._store.list_tags(route.key)
            if local is None:
                raise NameUnknown(f"repository {route.name} is not cached") from exc
            return paginate(local, n, last)


def check_rules(route: Route, reference: str | Digest | None) -> None:
    """Raise ``DENIED`` (naming the rule) when the upstream's rules refuse ``route.remote``
    by this tag, by digest, or (``None``: its tag list) as a repository."""
    rules = route.upstream_client.config.rules
    if rules is None:
        return
    tag = reference if isinstance(reference, str) else None
    decision = rules.decide(route.remote, tag)
    if not decision.allowed:
        what = (route.remote if reference is None
                else f"{route.remote}:{reference}" if tag is not None else f"{route.remote}@{reference}")
        raise decision.error(what)


def _not_vouched(exc: RegistryError, route: Route, digest: Digest, *, manifest: bool
                 ) -> RegistryError:
    """What a client hears when the upstream did not vouch for an object the repository has
    no link to: a 404 whatever the reason (a 404, a 429, an outage), so that the answer is
    the same whether or not the shared pool holds the object."""
    unknown = ManifestUnknown if manifest else BlobUnknown
    if isinstance(exc, unknown):
        return exc
    kind = "manifest" if manifest else "blob"
    return unknown(f"{kind} {digest} unknown to {route.name} "
                   f"(the upstream could not confirm it: {exc.message})")
