"""Prefetch: once an image manifest is fetched from the upstream for a client's GET, fill
its config and layers in the background, so the client's blob GETs that follow join fills
already under way (:meth:`~proxy.pullthrough.fills.Fills.get` shares one upstream transfer
between all who ask) instead of each starting one after the manifest round trip.

Client requests come first: nothing here runs in a client's request; prefetch fills run a
bounded number at a time (their own slots, so a client's fill never waits for one), and a
failure is logged and forgotten. A blob is prefetched only as the client's GET would fill
it: allowed by the upstream's rules, linked to the repository (the manifest fetch linked
what it references and the pool did not hold), not stored, not a foreign layer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from proxy import metrics
from proxy.mediatypes import references
from proxy.policy.limits import background
from proxy.pullthrough.fills import Fills
from proxy.reference import Digest
from proxy.results import CacheOutcome, FillingBlob
from proxy.routing import Route
from proxy.settings.prefetch import PrefetchConfig
from proxy.storage import Store
from proxy.storage.links import RepositoryLinks

log = logging.getLogger("regproxy.pullthrough")

#: Seconds a prefetched blob waits for a client before it counts as never requested.
UNREQUESTED_AFTER = 3600.0
#: Prefetched blobs remembered for that count (the oldest go first, counted unrequested).
REMEMBERED = 10_000
#: Blob prefetches queued or running at most; an image past it is prefetched in part.
MAX_PENDING = 4096


class Prefetch:
    """The prefetches of one process."""

    def __init__(self, store: Store, links: RepositoryLinks, fills: Fills, config: PrefetchConfig,
                 *, check: Callable[[Route, Digest], None]) -> None:
        self._store = store
        self._links = links
        self._fills = fills
        self._max_bytes = config.max_bytes
        self._slots = asyncio.Semaphore(config.concurrency)
        self._check = check  #: raises when the upstream's rules refuse the blob
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued: set[tuple[str, Digest]] = set()  #: (repository key, blob) pending
        #: Blobs a prefetch started that no client asked for yet: digest -> when (monotonic).
        self._started: OrderedDict[str, float] = OrderedDict()

    def image(self, route: Route, manifest: bytes) -> None:
        """Prefetch the blobs of an image manifest just fetched for ``route`` (returns at
        once: the work runs in background tasks)."""
        self._spawn(self._image(route, manifest))

    def requested(self, digest: Digest) -> None:
        """A client asked for ``digest`` (a blob GET): counted when a prefetch started it."""
        if self._started and self._started.pop(str(digest), None) is not None:
            metrics.count(metrics.PREFETCHES, "requested")

    async def close(self) -> None:
        """Cancel the prefetches (the fills they started are the fills' to cancel)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _image(self, route: Route, manifest: bytes) -> None:
        try:
            doc = json.loads(manifest)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        _, blobs = references(doc, distributable=True)  # (foreign layers left out)
        sizes: dict[object, object] = {
            d.get("digest"): d.get("size")
            for d in [doc.get("config"), *(doc.get("layers") or [])] if isinstance(d, dict)}
        total = 0
        for digest in dict.fromkeys(blobs):
            size = sizes.get(str(digest))
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                continue
            if self._max_bytes and total + size > self._max_bytes:
                continue  # past the cap: left to the client (a smaller one may still fit)
            key = (route.key, digest)
            if key in self._queued or len(self._queued) >= MAX_PENDING:
                continue
            total += size
            self._queued.add(key)
            self._spawn(self._blob(route, digest, size))

    async def _blob(self, route: Route, digest: Digest, size: int) -> None:
        try:
            async with self._slots:
                await self._fill(route, digest, size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a prefetch is a guess: its failure concerns nobody
            message = getattr(exc, "message", None) or type(exc).__name__
            log.info("prefetch of %s for %s failed: %s", digest, route.name, message)
        finally:
            self._queued.discard((route.key, digest))

    async def _fill(self, route: Route, digest: Digest, size: int) -> None:
        """Start (or join) the fill of ``digest`` the client's GET would start, and hold
        the slot until it ended."""
        self._check(route, digest)
        if self._fills.running_size(digest) is not None:
            return  # a client (or another prefetch) got there first
        if await self._store.blob_size(digest) is not None:
            return
        if not await self._links.holds_blob(route.key, digest):
            return  # the repository was not vouched for it: a client would HEAD first
        key = str(digest)
        self._remember(key)
        try:
            with background():  # its upstream GET waits behind clients' under the caps
                result = await self._fills.get(route, digest, size=size)
        except BaseException:
            self._started.pop(key, None)
            raise
        if not isinstance(result, FillingBlob):
            self._started.pop(key, None)
            return
        result.reader.close()
        if result.outcome is not CacheOutcome.MISS:  # joined a fill someone else started
            self._started.pop(key, None)
            return
        metrics.count(metrics.PREFETCHES, "started")
        await self._fills.wait_ended(digest)

    def _remember(self, key: str) -> None:
        """Note that a prefetch starts ``key``; those no client asked for within
        :data:`UNREQUESTED_AFTER` (or pushed out of the table) are counted unrequested."""
        now = time.monotonic()
        started = self._started
        expired = 0
        while started:
            oldest, when = next(iter(started.items()))
            if when > now - UNREQUESTED_AFTER and len(started) < REMEMBERED:
                break
            del started[oldest]
            expired += 1
        if expired:
            metrics.count(metrics.PREFETCHES, "unrequested", amount=expired)
        started[key] = now
        started.move_to_end(key)
