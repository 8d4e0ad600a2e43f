"""Tags of cached repositories: how long a tag's digest is trusted, and how it is
revalidated.

A tag is trusted for ``ttl`` after the upstream last confirmed it, then revalidated with a
``HEAD`` (which Docker Hub does not count against its pull limit) and re-fetched only when
the digest changed. Expired less than ``grace`` ago, it is answered at once while one
background ``HEAD`` revalidates it (one for all the workers of a host: a lock file). When
the upstream cannot answer, the last known tag is served (stale); while its circuit
breaker is open, without asking.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from proxy.bounded import BoundedDict
from proxy.errors import (
    BadGateway,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unavailable,
)
from proxy.mediatypes import INDEXES
from proxy.pullthrough.coordination import Coordination, HostLock, from_peer
from proxy.pullthrough.manifests import Manifests
from proxy.reference import Digest
from proxy.results import CacheOutcome, ManifestResult
from proxy.routing import Route
from proxy.sharedcache import SharedCache
from proxy.singleflight import SingleFlight
from proxy.storage import Store
from proxy.storage.failures import storage_failure
from proxy.storage.links import RepositoryLinks
from proxy.upstream import BreakerState

log = logging.getLogger("regproxy.pullthrough")


def tag_key(repository: str, tag: str) -> str:
    """A tag's key (``repository`` is the storage key) in this process's memory and in the
    shared tag cache."""
    return f"{repository}:{tag}"


class Tags:
    """Resolves tags of cached repositories to manifests, within their freshness."""

    def __init__(self, store: Store, manifests: Manifests, links: RepositoryLinks,
                 shared: SharedCache, coordination: Coordination, host_lock: HostLock, *,
                 ttl: float, grace: float = 0.0) -> None:
        self._store = store
        self._manifests = manifests
        self._links = links
        self._shared = shared  #: confirmations by any process or replica (aiocache)
        self._coordination = coordination
        self._host_lock = host_lock
        self.ttl = ttl
        self.grace = grace
        #: This process's memory of confirmed tags: key -> (digest, until when, monotonic).
        self._l1: BoundedDict[str, tuple[Digest, float]] = BoundedDict(100_000)
        self._flight: SingleFlight[ManifestResult] = SingleFlight()
        self._refreshing: dict[str, asyncio.Task[None]] = {}  #: background revalidations
        #: Background revalidations at a time: tags warmed together expire together, and
        #: hundreds of HEADs at once would stall this process's clients (within the grace
        #: a revalidation may as well wait its turn).
        self._refresh_slots = asyncio.Semaphore(8)

    def fresh_in_memory(self, route: Route, tag: str) -> Digest | None:
        """The digest of a fresh tag this process holds (no I/O: the hot path)."""
        entry = self._l1.get(tag_key(route.key, tag))
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    async def validated_at(self, route: Route, tag: str) -> tuple[float, bool] | None:
        """When the upstream last confirmed ``tag`` (unix time; the tag link's mtime, which
        workers and replicas share) and whether that is within the TTL (the console)."""
        stored, age = await self._store.tag_with_age(route.key, tag)
        if stored is None:
            return None
        return time.time() - age, age < self.ttl

    async def forget(self) -> None:
        """Drop what this process holds (the store was purged behind its back)."""
        self._l1.clear()
        await self._shared.forget_local()

    def running(self) -> list[asyncio.Future[Any]]:
        """Revalidations in flight, foreground and background (cancelled at shutdown)."""
        return [*self._refreshing.values(), *self._flight.running()]

    async def resolve(self, route: Route, tag: str, *, head: bool) -> ManifestResult:
        """The manifest ``tag`` names: trusted, revalidated, fetched, or stale."""
        key = tag_key(route.key, tag)
        digest, stale = await self._fresh(route, tag, key)
        if digest is not None:
            local = await self._manifests.local(digest)
            if local is not None:
                if stale:
                    self._refresh_in_background(route, tag, key)
                    return ManifestResult.of(local, CacheOutcome.REFRESHING)
                return ManifestResult.of(local, CacheOutcome.HIT)
        outage = await self._stale_in_outage(route, tag, key)
        if outage is not None:
            return outage
        result, shared = await self._flight.do(
            ("head" if head else "get", key),
            lambda: self._revalidate(route, tag, key, want_body=not head))
        return replace(result, outcome=CacheOutcome.COALESCED if shared else result.outcome)

    async def revalidate_now(self, route: Route, tag: str) -> ManifestResult:
        """Ask the upstream what ``tag`` is now, whatever its freshness (an operator's
        "re-validate": a HEAD, a GET only when the digest changed), joined with any
        revalidation of the same tag in flight."""
        key = tag_key(route.key, tag)
        result, _ = await self._flight.do(
            ("get", key), lambda: self._revalidate(route, tag, key, want_body=True))
        return result

    async def _fresh(self, route: Route, tag: str, key: str) -> tuple[Digest | None, bool]:
        """The digest of a tag confirmed upstream less than ``ttl`` ago, if any, and
        whether it is stale: expired less than ``grace`` ago, so it may be answered while
        a background HEAD revalidates it.

        Three places, fastest first: this process's memory; the shared cache backend
        (aiocache); the tag link in the store, whose mtime is the last confirmation, so
        sibling workers and restarts share one revalidation per TTL.
        """
        if self.ttl <= 0:
            return None, False
        now = time.monotonic()
        entry = self._l1.get(key)
        if entry is not None and entry[1] > now:
            return entry[0], False
        cached = await self._shared.get(key)  # (a sibling or replica may have revalidated it)
        if cached is not None:
            digest = Digest.parse(cached)
            expires = now + min(self.ttl, 1.0)
        else:
            stored, age = await self._store.tag_with_age(route.key, tag)
            if stored is None or age >= self.ttl:
                if entry is not None and entry[1] + self.grace > now:
                    return entry[0], True
                stale = stored is not None and age < self.ttl + self.grace
                return (stored if stale else None), stale
            digest, expires = stored, now + self.ttl - age
        self._l1[key] = (digest, expires)
        return digest, False

    async def _stale_in_outage(self, route: Route, tag: str, key: str) -> ManifestResult | None:
        """The last known manifest of an expired tag while the upstream's breaker is not
        closed: no client with a cached copy waits for a probe (a hung upstream would hold
        it for the whole timeout). Past the cooldown the probe is this tag's background
        revalidation; while the circuit is open nothing goes upstream."""
        state = route.upstream_client.breaker.state
        if state is BreakerState.CLOSED:
            return None
        previous = await self._store.get_tag(route.key, tag)
        local = None if previous is None else await self._manifests.local(previous)
        if local is None:
            return None
        if state is BreakerState.HALF_OPEN:
            self._refresh_in_background(route, tag, key)
        return ManifestResult.of(local, CacheOutcome.STALE)

    def _refresh_in_background(self, route: Route, tag: str, key: str) -> None:
        """Revalidate a stale tag once, off the request path (joined by any foreground
        revalidation of the same tag); its failures are logged, the stale answer stands."""
        if key in self._refreshing:
            return

        async def refresh() -> None:
            try:
                async with self._refresh_slots:
                    with self._host_lock(f"tag:{key}") as mine:
                        if not mine:
                            return  # a sibling worker is on it; its answer lands in the store
                        fresh, stale = await self._fresh(route, tag, key)
                        if fresh is not None and not stale:
                            return  # a sibling worker or replica revalidated it meanwhile
                        await self._flight.do(("get", key), lambda: self._revalidate(
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

    async def _revalidate(self, route: Route, tag: str, key: str, *, want_body: bool
                          ) -> ManifestResult:
        """Ask the upstream what ``tag`` is now (a HEAD; a GET when the digest is new) and
        record the confirmation; the last known manifest when the upstream cannot say."""
        if self.ttl > 0:
            shared = await self._from_peer(key)
            if shared is not None:
                return shared
        previous = await self._store.get_tag(route.key, tag)
        try:
            if previous is None and want_body:
                result = await self._manifests.fetch(route, tag, None)
                outcome = CacheOutcome.MISS
            else:
                head = await self._manifests.head(route, tag, expect=None)
                local = await self._manifests.local(head.digest)
                if local is not None:  # the tag is confirmed below, in one write
                    await self._links.add_manifest(route.key, local)  # (the upstream vouched)
                    result = ManifestResult.of(local, CacheOutcome.HIT)
                    outcome = CacheOutcome.REVALIDATED if previous is not None else CacheOutcome.HIT
                else:
                    await self._store.set_tag(route.key, tag, head.digest)
                    if not want_body and head.media_type not in INDEXES:
                        return head  # HEAD never downloads a body, except an index's
                    result = await self._manifests.fetch(route, str(head.digest), head.digest)
                    outcome = CacheOutcome.MISS
        except (Unavailable, TooManyRequests, BadGateway, ManifestUnknown, NameUnknown) as exc:
            stale = await self._manifests.local(previous) if previous is not None else None
            if stale is None:
                raise
            log.warning("serving stale %s:%s (%s) because upstream %s failed: %s", route.name,
                        tag, previous, route.upstream_client.name, exc.message)
            return ManifestResult.of(stale, CacheOutcome.STALE)
        await self._store.set_tag(route.key, tag, result.digest, confirmed=True)
        if self.ttl > 0:  # aiocache reads a ttl of 0 as "forever"; 0 means "always ask"
            self._l1[key] = (result.digest, time.monotonic() + self.ttl)
            await self._shared.set(key, str(result.digest), ttl=self.ttl)
        return replace(result, outcome=outcome)

    async def _from_peer(self, key: str) -> ManifestResult | None:
        """A tag another replica is revalidating right now: its answer, from the shared
        tag cache (see :func:`~proxy.pullthrough.coordination.from_peer`)."""
        async def shared() -> ManifestResult | None:
            cached = await self._shared.get(key)
            local = None if cached is None else await self._manifests.local(Digest.parse(cached))
            if local is None:
                return None
            self._l1[key] = (local.digest, time.monotonic() + min(self.ttl, 1.0))
            return ManifestResult.of(local, CacheOutcome.COALESCED)

        return await from_peer(self._coordination, f"tag:{key}", shared)
