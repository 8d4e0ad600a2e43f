"""The pull-through service: answers manifest, blob and tag reads for cached repositories.

Data flows one way: handlers call this service, which reads the store and, on a miss,
the upstream client. Manifests by digest are immutable and kept forever; tags are trusted
for ``tag_ttl`` and then revalidated with a HEAD (which Docker Hub does not count against
its pull limit). When the upstream cannot answer, the last known tag is served (stale).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import replace
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
    GENERIC_TYPES,
    IMAGE_MANIFESTS,
    INDEXES,
    UPSTREAM_ACCEPT,
    accepts,
    platform_child,
    sniff_media_type,
)
from proxy.pullthrough.cluster import Cluster, FillLease, Holder, RemoteReader
from proxy.pullthrough.fill import BlobFill, TailReader
from proxy.pullthrough.links import RepositoryLinks
from proxy.pullthrough.lru import ManifestLRU
from proxy.reference import Digest
from proxy.results import (
    BlobReader,
    BlobResult,
    CacheOutcome,
    FillingBlob,
    ManifestResult,
    StoredBlob,
    UpstreamHead,
    paginate,
)
from proxy.routing import Route
from proxy.sharedcache import SharedCache
from proxy.singleflight import KeyedLocks, SingleFlight
from proxy.storage import BlobWriter, FilesystemStore, Store, StoredManifest
from proxy.storage.failures import storage_failure
from proxy.upstream import BreakerState, Endpoint, read_capped, upstream_error

log = logging.getLogger("regproxy.pullthrough")

class PullThrough:
    """Reads of cached repositories, backed by the store and the upstreams."""

    def __init__(
        self,
        store: Store,
        staging: FilesystemStore,
        tag_cache: SharedCache,
        *,
        tag_ttl: float,
        tag_grace: float = 0.0,
        max_manifest_size: int,
        manifest_memory: int,
        default_platform: tuple[str, str],
        cluster: Cluster | None = None,
    ) -> None:
        self.store = store
        self.staging = staging
        self.cluster = cluster
        self._tags = tag_cache
        self.tag_ttl = tag_ttl
        self.tag_grace = tag_grace
        self.max_manifest_size = max_manifest_size
        self.default_platform = default_platform
        self._memory = ManifestLRU(manifest_memory)
        self.links = RepositoryLinks(store)
        self._flight: SingleFlight[ManifestResult] = SingleFlight()
        self._head_flight: SingleFlight[int] = SingleFlight()  #: per repository and blob
        self._fills: dict[str, BlobFill] = {}
        self._claiming = KeyedLocks()  #: one claim at a time per blob
        #: fills other replicas run (holder, until when to believe it)
        self._holders: BoundedDict[str, tuple[Holder, float]] = BoundedDict(10_000)
        self._fill_tasks: set[asyncio.Task[None]] = set()
        self._refreshing: dict[str, asyncio.Task[None]] = {}  #: background tag revalidations
        #: Background revalidations at a time: tags warmed together expire together, and
        #: hundreds of HEADs at once would stall this process's clients (within the grace
        #: a revalidation may as well wait its turn).
        self._refresh_slots = asyncio.Semaphore(8)
        self._touched: BoundedDict[Digest, float] = BoundedDict(200_000)
        self._tag_l1: BoundedDict[str, tuple[Digest, float]] = BoundedDict(100_000)
        #: Seconds between two recency updates of one object by this process.
        self.touch_interval = 30.0
        #: Called after each successful fill (the evictor checks the budget).
        self.after_fill: Callable[[], None] | None = None
        #: Called before a new fill; raises to refuse it (the free-space watermark).
        self.before_fill: Callable[[], None] | None = None

    async def touch(self, digest: Digest) -> None:
        """Record an access (the object's mtime is its last use, for LRU eviction)."""
        if self._touch_due(digest):
            await self.store.touch_blob(digest)

    def _touch_due(self, digest: Digest) -> bool:
        """Whether this process should record an access of ``digest`` now (at most one per
        ``touch_interval``); remembers that it did."""
        now = time.monotonic()
        last = self._touched.get(digest)
        if last is not None and now - last < self.touch_interval:
            return False
        self._touched[digest] = now
        return True

    def forget(self, digests: list[Digest]) -> None:
        """Drop evicted objects from the in-memory caches of this process."""
        for digest in digests:
            self._memory.discard(str(digest))
            self._touched.pop(digest, None)

    async def watch_purges(self, interval: float = 1.0) -> None:
        """Every ``interval``, compare the store's purge marker (``regproxy cache purge``
        changes it); when it changed, drop the tags, manifests and links this process
        holds in memory, so nothing purged is served from memory (they are read again
        from the store, or the upstream)."""
        seen: str | None = None
        first = True
        while True:
            try:
                marker = await self.store.purge_marker()
            except Exception as exc:  # an object store that is down: try again later
                log.debug("cannot read the purge marker: %s", type(exc).__name__)
            else:
                if not first and marker != seen:
                    self._tag_l1.clear()
                    self._memory.clear()
                    self.links.forget()
                    await self._tags.forget_local()
                    log.info("the store was purged: in-memory tags and manifests dropped")
                seen, first = marker, False
            await asyncio.sleep(interval)

    # -- manifests ---------------------------------------------------------------------

    async def local_manifest(self, digest: Digest) -> StoredManifest | None:
        """A stored manifest by digest, from memory when hot."""
        key = str(digest)
        item = self._memory.get(key)
        if item is None:
            item = await self.store.get_manifest(digest)
            if item is not None:
                self._memory.put(item)
        return item

    async def manifest(
        self, route: Route, reference: str | Digest, accepted: AbstractSet[str], *, head: bool
    ) -> ManifestResult:
        """Resolve a manifest by tag or digest, filling the cache on a miss."""
        result = self._in_memory(route, reference, accepted)
        if result is None:
            if isinstance(reference, Digest):
                result = await self._manifest_by_digest(route, reference, head=head)
            else:
                result = await self._manifest_by_tag(route, reference, head=head)
                result = await self._negotiate(route, result, accepted, head=head)
        if result.data is not None and self._touch_due(result.digest):
            await self.store.touch_blob(result.digest)
        return result

    def _in_memory(self, route: Route, reference: str | Digest, accepted: AbstractSet[str]
                   ) -> ManifestResult | None:
        """The answer when this process holds everything it needs (a fresh tag, the
        manifest, a type the client takes): the hot path, with no awaits."""
        if isinstance(reference, Digest):
            if not self.links.known(route.key, reference):
                return None
            digest = reference
        else:
            entry = self._tag_l1.get(_tag_key(route, reference))
            if entry is None or entry[1] <= time.monotonic():
                return None
            digest = entry[0]
        item = self._memory.get(str(digest))
        if item is None or (digest is not reference and not accepts(accepted, item.media_type)):
            return None
        return _result(item, CacheOutcome.HIT)

    async def _manifest_by_digest(self, route: Route, digest: Digest, *, head: bool) -> ManifestResult:
        local = await self.local_manifest(digest)
        linked = await self.links.holds_manifest(route.key, digest)
        if local is not None:
            if not linked:
                await self._confirm(route, digest, manifest=True)
                await self.links.add_manifest(route.key, local)
            return _result(local, CacheOutcome.HIT)
        try:
            if head:
                return await self._head_manifest(route, str(digest), expect=digest)
            result, shared = await self._flight.do(  # per repository: it links the result
                ("manifest", route.key, str(digest)), lambda: self._fetch_by_digest(route, digest))
        except RegistryError as exc:
            if linked:
                raise
            raise _not_vouched(exc, route, digest, manifest=True) from None
        return replace(result, outcome=CacheOutcome.COALESCED if shared else result.outcome)

    async def _fetch_by_digest(self, route: Route, digest: Digest) -> ManifestResult:
        async def stored() -> ManifestResult | None:
            item = await self.local_manifest(digest)  # (the peer linked it: same repository)
            if item is None or not await self.links.holds_manifest(route.key, digest):
                return None
            return _result(item, CacheOutcome.COALESCED)

        peer = await self._from_peer(f"manifest:{route.key}@{digest}", stored)
        return peer if peer is not None else await self._fetch_manifest(route, str(digest), digest)

    async def _from_peer(self, job: str, probe: Callable[[], Awaitable[ManifestResult | None]],
                         wait: float = 5.0) -> ManifestResult | None:
        """When another replica is already asking the upstream for the same manifest, wait
        (up to ``wait``) for its answer through ``probe`` rather than asking too: registries
        such as Docker Hub count manifest requests against pull limits. ``None``: ask the
        upstream here (no cluster, this replica goes first, or the peer took too long)."""
        if self.cluster is None or await self.cluster.first(job, wait):
            return None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            found = await probe()
            if found is not None:
                return found
        return None

    async def _manifest_by_tag(self, route: Route, tag: str, *, head: bool) -> ManifestResult:
        key = _tag_key(route, tag)
        digest, stale = await self._fresh_tag(route, tag, key)
        if digest is not None:
            local = await self.local_manifest(digest)
            if local is not None:
                if stale:
                    self._refresh_in_background(route, tag, key)
                    return _result(local, CacheOutcome.REFRESHING)
                return _result(local, CacheOutcome.HIT)
        outage = await self._stale_in_outage(route, tag, key)
        if outage is not None:
            return outage
        flight_key = ("head" if head else "get", key)
        result, shared = await self._flight.do(
            flight_key, lambda: self._refresh_tag(route, tag, key, want_body=not head)
        )
        return replace(result, outcome=CacheOutcome.COALESCED if shared else result.outcome)

    async def _fresh_tag(self, route: Route, tag: str, key: str) -> tuple[Digest | None, bool]:
        """The digest of a tag confirmed upstream less than ``tag_ttl`` ago, if any, and
        whether it is stale: expired less than ``tag_grace`` ago, so it may be answered
        while a background HEAD revalidates it.

        Three places, fastest first: this process's memory; the shared cache backend
        (aiocache); the tag link in the store, whose mtime is the last confirmation, so
        sibling workers and restarts share one revalidation per TTL.
        """
        if self.tag_ttl <= 0:
            return None, False
        now = time.monotonic()
        entry = self._tag_l1.get(key)
        if entry is not None and entry[1] > now:
            return entry[0], False
        cached = await self._tags.get(key)  # (a sibling or replica may have revalidated it)
        if cached is not None:
            digest = Digest.parse(cached)
            expires = now + min(self.tag_ttl, 1.0)
        else:
            stored, age = await self.store.tag_with_age(route.key, tag)
            if stored is None or age >= self.tag_ttl:
                if entry is not None and entry[1] + self.tag_grace > now:
                    return entry[0], True
                stale = stored is not None and age < self.tag_ttl + self.tag_grace
                return (stored if stale else None), stale
            digest, expires = stored, now + self.tag_ttl - age
        self._remember_tag(key, digest, expires)
        return digest, False

    async def _stale_in_outage(self, route: Route, tag: str, key: str) -> ManifestResult | None:
        """The last known manifest of an expired tag while the upstream's breaker is not
        closed: no client with a cached copy waits for a probe (a hung upstream would hold
        it for the whole timeout). Past the cooldown the probe is this tag's background
        revalidation; while the circuit is open nothing goes upstream."""
        state = route.upstream_client.breaker.state
        if state is BreakerState.CLOSED:
            return None
        previous = await self.store.get_tag(route.key, tag)
        local = None if previous is None else await self.local_manifest(previous)
        if local is None:
            return None
        if state is BreakerState.HALF_OPEN:
            self._refresh_in_background(route, tag, key)
        return _result(local, CacheOutcome.STALE)

    def _refresh_in_background(self, route: Route, tag: str, key: str) -> None:
        """Revalidate a stale tag once, off the request path (joined by any foreground
        revalidation of the same tag); its failures are logged, the stale answer stands."""
        if key in self._refreshing:
            return

        async def refresh() -> None:
            try:
                async with self._refresh_slots:
                    with self.staging.try_lock(f"tag:{key}") as mine:
                        if not mine:
                            return  # a sibling worker is on it; its answer lands in the store
                        fresh, stale = await self._fresh_tag(route, tag, key)
                        if fresh is not None and not stale:
                            return  # a sibling worker or replica revalidated it meanwhile
                        await self._flight.do(("get", key), lambda: self._refresh_tag(
                            route, tag, key, want_body=True))
            except RegistryError as exc:
                log.info("background revalidation of %s failed: %s", key, exc.message)
            except Exception as exc:
                failed = storage_failure(exc)  # a full disk: one line, no traceback
                if failed is None:
                    log.exception("background revalidation of %s failed", key)
                else:
                    log.error("background revalidation of %s failed: %s", key, failed.message)
            finally:
                self._refreshing.pop(key, None)

        self._refreshing[key] = asyncio.create_task(refresh())

    def _remember_tag(self, key: str, digest: Digest, expires: float) -> None:
        """This process's memory of a tag's digest, until ``expires`` (monotonic)."""
        self._tag_l1[key] = (digest, expires)

    async def _refresh_tag(self, route: Route, tag: str, key: str, *, want_body: bool
                           ) -> ManifestResult:
        if self.cluster is not None and self.tag_ttl > 0:
            shared = await self._tag_from_peer(key)
            if shared is not None:
                return shared
        previous = await self.store.get_tag(route.key, tag)
        try:
            if previous is None and want_body:
                result = await self._fetch_manifest(route, tag, None)
                outcome = CacheOutcome.MISS
            else:
                head = await self._head_manifest(route, tag, expect=None)
                local = await self.local_manifest(head.digest)
                if local is not None:  # the tag is confirmed below, in one write
                    await self.links.add_manifest(route.key, local)  # (the upstream vouched)
                    result, outcome = _result(local, CacheOutcome.HIT), (
                        CacheOutcome.REVALIDATED if previous is not None else CacheOutcome.HIT)
                else:
                    await self.store.set_tag(route.key, tag, head.digest)
                    if not want_body and head.media_type not in INDEXES:
                        return head  # HEAD never downloads a body, except an index's
                    result = await self._fetch_manifest(route, str(head.digest), head.digest)
                    outcome = CacheOutcome.MISS
        except (Unavailable, TooManyRequests, BadGateway, ManifestUnknown, NameUnknown) as exc:
            stale = await self.local_manifest(previous) if previous is not None else None
            if stale is None:
                raise
            log.warning("serving stale %s:%s (%s) because upstream %s failed: %s", route.name,
                        tag, previous, route.upstream_client.name, exc.message)
            return _result(stale, CacheOutcome.STALE)
        await self.store.set_tag(route.key, tag, result.digest, confirmed=True)
        if self.tag_ttl > 0:  # aiocache reads a ttl of 0 as "forever"; 0 means "always ask"
            self._remember_tag(key, result.digest, time.monotonic() + self.tag_ttl)
            await self._tags.set(key, str(result.digest), ttl=self.tag_ttl)
        return replace(result, outcome=outcome)

    async def _tag_from_peer(self, key: str) -> ManifestResult | None:
        """A tag another replica is revalidating right now: its answer, from the shared
        tag cache (see :meth:`_from_peer`)."""
        async def shared() -> ManifestResult | None:
            cached = await self._tags.get(key)
            local = None if cached is None else await self.local_manifest(Digest.parse(cached))
            if local is None:
                return None
            self._remember_tag(key, local.digest, time.monotonic() + min(self.tag_ttl, 1.0))
            return _result(local, CacheOutcome.COALESCED)

        return await self._from_peer(f"tag:{key}", shared)

    async def _head_manifest(self, route: Route, ref: str, expect: Digest | None) -> ManifestResult:
        upstream = route.upstream_client
        async with upstream.request("HEAD", route.remote, Endpoint.MANIFESTS, ref,
                                    headers={"Accept": UPSTREAM_ACCEPT}) as resp:
            if resp.status != 200:
                raise upstream_error(resp, upstream, f"manifest {route.remote}:{ref}",
                                     ManifestUnknown)
            header = resp.headers.get("Docker-Content-Digest")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            size = resp.content_length
        if header is None or size is None or not media_type:
            # Not enough to answer a HEAD from (some registries omit the digest): GET it.
            return await self._fetch_manifest(route, ref, expect)
        try:
            digest = Digest.parse(header)
        except RegistryError:
            raise BadGateway(f"upstream {upstream.name} sent a bad digest header") from None
        if expect is not None and digest != expect:
            raise BadGateway(f"upstream {upstream.name} answered {digest} for {expect}")
        return ManifestResult(digest, media_type, size, None, CacheOutcome.MISS)

    async def _fetch_manifest(self, route: Route, ref: str, expect: Digest | None
                              ) -> ManifestResult:
        """GET a manifest upstream, verify it, store it byte for byte."""
        upstream = route.upstream_client
        async with upstream.request("GET", route.remote, Endpoint.MANIFESTS, ref,
                                    headers={"Accept": UPSTREAM_ACCEPT}) as resp:
            if resp.status != 200:
                raise upstream_error(resp, upstream, f"manifest {route.remote}:{ref}",
                                     ManifestUnknown)
            if (resp.content_length or 0) > self.max_manifest_size:
                raise BadGateway(f"upstream manifest exceeds {self.max_manifest_size} bytes")
            data = await read_capped(resp, self.max_manifest_size)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header = resp.headers.get("Docker-Content-Digest")
        if media_type in GENERIC_TYPES:
            media_type = sniff_media_type(data) or media_type or "application/json"
        if expect is None and header is not None:
            try:
                expect = Digest.parse(header)
            except RegistryError:
                raise BadGateway(f"upstream {upstream.name} sent a bad digest header") from None
        digest = Digest.of(data, expect.algorithm if expect else "sha256")
        if expect is not None and digest != expect:
            log.error("upstream %s sent manifest %s for %s (expected %s)", upstream.name,
                      digest, ref, expect)
            raise BadGateway(f"upstream manifest digest {digest} does not match {expect}")
        item = StoredManifest(digest, media_type, data)
        await self.store.put_manifest(item.digest, item.data, item.media_type)
        await self.links.add_manifest(route.key, item)
        self._memory.put(item)
        return _result(item, CacheOutcome.MISS)

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

    # -- blobs -------------------------------------------------------------------------

    async def blob(self, route: Route, digest: Digest, *, head: bool) -> BlobResult:
        """Find a blob of the repository: stored, being filled, or (GET) start a fill;
        HEAD asks upstream. A blob the repository holds no link to is first confirmed
        upstream for its name (a HEAD): the pool is shared by every repository."""
        size = await self.store.blob_size(digest)
        linked = await self.links.holds_blob(route.key, digest)
        if size is not None and linked:
            await self.touch(digest)
            return StoredBlob(digest, size, CacheOutcome.HIT)
        key = str(digest)
        fill = self._fills.get(key)
        if head and linked and fill is not None and fill.size is not None:
            return UpstreamHead(digest, fill.size, CacheOutcome.COALESCED)
        if head or not linked:
            upstream_size, shared = await self._confirm(route, digest, manifest=False)
            await self.links.add_blob(route.key, digest)
            if size is not None:
                await self.touch(digest)
                return StoredBlob(digest, size, CacheOutcome.HIT)
            if head:
                return UpstreamHead(digest, upstream_size,
                                    CacheOutcome.COALESCED if shared else CacheOutcome.MISS)
        if fill is not None:
            return await self._join(fill, CacheOutcome.COALESCED)
        if self.before_fill is not None:
            self.before_fill()
        # a dead replica's lease blocks the blob until it expires: wait that long, not more
        patience = 1.0 if self.cluster is None else self.cluster.lease + 5.0
        deadline = time.monotonic() + patience
        while True:
            async with self._claiming.hold(key):
                found = await self._claim_or_join(route, digest)
            if not isinstance(found, Holder):
                return found
            remote = await self._remote(route, digest, found)  # outside the lock: in parallel
            if remote is not None:
                return remote
            self._holders.pop(key, None)  # it finished, or died: look again
            size = await self.store.blob_size(digest)
            if size is not None:
                return StoredBlob(digest, size, CacheOutcome.HIT)
            if time.monotonic() > deadline:
                # a live holder (it keeps renewing its lease) that this replica cannot
                # reach: a wrong cluster.advertise_url, or a network split. Serving the
                # client beats single flight: fill here too, without the lease.
                writer = self.staging.claim_fill(digest)
                if writer is None:
                    raise Unavailable(f"could not start or join a fill of {digest}")
                log.warning("fill holder %s of %s unreachable for %.0f s; filling here too",
                            found.url, digest, patience)
                return await self._join(self._start_fill(route, digest, writer, None), CacheOutcome.MISS)
            await asyncio.sleep(0.1)

    async def _claim_or_join(self, route: Route, digest: Digest
                             ) -> StoredBlob | FillingBlob | Holder:
        """Start the fill, or join whoever runs it: this process, a sibling worker on this
        host, or (returned) another replica. Retried a few times: a fill can end between
        two looks."""
        key, delay = str(digest), 0.01
        for _ in range(8):
            fill = self._fills.get(key)
            if fill is not None:
                return await self._join(fill, CacheOutcome.COALESCED)
            known = self._holders.get(key)
            if known is not None and known[1] > time.monotonic():
                return known[0]  # learnt by an earlier client: no Redis round trip
            writer = self.staging.claim_fill(digest)
            if writer is not None:
                size = await self.store.blob_size(digest)
                if size is not None:  # a sibling published it just before our claim
                    writer.abort()
                    return StoredBlob(digest, size, CacheOutcome.HIT)
                lease = await self.cluster.claim(digest) if self.cluster is not None else None
                if isinstance(lease, Holder):  # another replica is filling it
                    writer.abort()
                    self._holders[key] = (lease, time.monotonic() + 1.0)
                    return lease
                if lease is not None:  # a filler publishes before it lets go of the lease,
                    size = await self.store.blob_size(digest)  # so look once more
                    if size is not None:
                        writer.abort()
                        await lease.release()
                        return StoredBlob(digest, size, CacheOutcome.HIT)
                fill = self._start_fill(route, digest, writer, lease)
                return await self._join(fill, CacheOutcome.MISS)
            tail = await TailReader.open(self.staging, self.store, digest)  # a sibling worker
            if tail is not None:
                return FillingBlob(digest, tail.size, tail, CacheOutcome.COALESCED)
            size = await self.store.blob_size(digest)
            if size is not None:  # it finished meanwhile
                return StoredBlob(digest, size, CacheOutcome.HIT)
            await asyncio.sleep(delay)
            delay *= 2
        raise Unavailable(f"could not start or join a fill of {digest}")

    async def local_fill(self, digest: Digest) -> FillingBlob | None:
        """A fill of ``digest`` running in this process or a sibling worker, to serve
        another replica from (the cluster's internal endpoint)."""
        fill = self._fills.get(str(digest))
        if fill is not None:
            return await self._join(fill, CacheOutcome.COALESCED)
        tail = await TailReader.open(self.staging, self.store, digest)
        return None if tail is None else FillingBlob(digest, tail.size, tail, CacheOutcome.COALESCED)

    async def _remote(self, route: Route, digest: Digest, holder: Holder) -> FillingBlob | None:
        assert self.cluster is not None
        resp = await self.cluster.open_remote(holder, digest)
        if resp is None:
            return None

        async def reopen(start: int, end: int | None) -> AsyncIterator[bytes]:
            result = await self.blob(route, digest, head=False)
            if isinstance(result, FillingBlob):
                return _closing(result.reader, start, end)
            return self.store.open_blob(digest, start, end)

        reader = RemoteReader(self.cluster, holder, digest, resp, reopen)
        return FillingBlob(digest, reader.size, reader, CacheOutcome.COALESCED)

    async def _join(self, fill: BlobFill, outcome: CacheOutcome) -> FillingBlob:
        reader = fill.reader()
        try:
            size = await fill.wait_headers()
        except BaseException:
            reader.close()
            raise
        return FillingBlob(fill.digest, size, reader, outcome)

    def _start_fill(self, route: Route, digest: Digest, writer: BlobWriter,
                    lease: FillLease | None) -> BlobFill:
        fill = BlobFill(digest, writer, self.store.fill_sink(digest),
                        guard=lease.still_held if lease is not None else None)
        key = str(digest)
        self._fills[key] = fill

        def settled(f: BlobFill) -> None:
            if self._fills.get(key) is f:
                del self._fills[key]
                if f.error is None and self.after_fill is not None:
                    self.after_fill()

        task = asyncio.create_task(self._run_fill(fill, route, settled, lease))
        self._fill_tasks.add(task)
        task.add_done_callback(self._fill_tasks.discard)
        return fill

    @staticmethod
    async def _run_fill(fill: BlobFill, route: Route, settled: Callable[[BlobFill], None],
                        lease: FillLease | None) -> None:
        if lease is None:
            await fill.run(route.upstream_client, route.remote, settled)
            return
        async with lease.kept():
            await fill.run(route.upstream_client, route.remote, settled)

    async def _confirm(self, route: Route, digest: Digest, *, manifest: bool) -> tuple[int, bool]:
        """Ask the upstream whether the repository holds ``digest`` (one HEAD per repository
        and object at a time): ``(size, shared)``. Whatever keeps it from saying yes (a 404,
        an outage) is a 404 here: an object the repository is not known to hold is never
        served, and the answer must not tell whether the pool has it."""
        kind = "manifest" if manifest else "blob"
        try:
            return await self._head_flight.do(
                (kind, route.key, str(digest)), lambda: self._head_object(route, digest, manifest))
        except RegistryError as exc:
            raise _not_vouched(exc, route, digest, manifest=manifest) from None

    async def _head_object(self, route: Route, digest: Digest, manifest: bool) -> int:
        upstream = route.upstream_client
        if manifest:
            return (await self._head_manifest(route, str(digest), expect=digest)).size
        async with upstream.request("HEAD", route.remote, Endpoint.BLOBS, digest) as resp:
            if resp.status != 200:
                raise upstream_error(resp, upstream, f"blob {digest}", BlobUnknown)
            if resp.content_length is None:
                raise BadGateway(f"upstream {upstream.name} sent no Content-Length for {digest}")
            return resp.content_length

    async def close(self) -> None:
        """Cancel running fills (their temp files are removed); fills whose content is
        already verified get a few seconds to publish it (an S3 commit) first."""
        # revalidations and manifest/HEAD flights use the upstream session, closed next
        upstream_work: list[asyncio.Future[Any]] = [
            *self._refreshing.values(), *self._flight.running(), *self._head_flight.running()]
        for work in upstream_work:
            work.cancel()
        if upstream_work:
            await asyncio.wait(upstream_work, timeout=5)
        if self._fill_tasks:
            log.info("cancelling %d blob fill(s) from upstreams still running (their temp files "
                     "are removed; verified ones get 5 s to publish first)", len(self._fill_tasks))
        if self._fill_tasks and any(f.verified for f in self._fills.values()):
            await asyncio.wait(list(self._fill_tasks), timeout=5)
        for task in list(self._fill_tasks):
            task.cancel()
        if self._fill_tasks:
            await asyncio.wait(list(self._fill_tasks), timeout=10)

    # -- tags --------------------------------------------------------------------------

    async def tags(self, route: Route, n: int | None, last: str | None) -> tuple[list[str], bool]:
        """Tags from the upstream (paginated there); the stored ones if it is unreachable.

        Returns ``(tags, more)``.
        """
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
            local = await self.store.list_tags(route.key)
            if local is None:
                raise NameUnknown(f"repository {route.name} is not cached") from exc
            return paginate(local, n, last)


async def _closing(reader: BlobReader, start: int, end: int | None) -> AsyncIterator[bytes]:
    try:
        async for chunk in reader.stream(start, end):
            yield chunk
    finally:
        reader.close()


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


def tag_key(repository: str, tag: str) -> str:
    """A tag's key (``repository`` is the storage key) in this process's memory and in the
    shared tag cache."""
    return f"{repository}:{tag}"


def _tag_key(route: Route, tag: str) -> str:
    return tag_key(route.key, tag)


def _result(item: StoredManifest, outcome: CacheOutcome) -> ManifestResult:
    return ManifestResult(item.digest, item.media_type, len(item.data), item.data, outcome)

