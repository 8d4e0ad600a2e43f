"""Single flight of blob downloads: one upstream GET per blob, whoever asks for it.

:meth:`Fills.get` hands a client the blob's bytes as they arrive, from one of three
places: a fill this process runs (:class:`~proxy.pullthrough.fill.BlobFill`), one a
sibling worker on this host runs (its locked temp file, tailed:
:class:`~proxy.pullthrough.fill.TailReader`), or one another replica runs (streamed from
it, when the :class:`~proxy.pullthrough.coordination.Coordination` chosen at wiring has
replicas). When none runs, it starts one. The bytes are teed to every reader and to the
store, and verified before the blob becomes visible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from proxy.bounded import BoundedDict
from proxy.errors import Unavailable
from proxy.pullthrough.coordination import SOLE, Coordination, Holder, Lease
from proxy.pullthrough.fill import BlobFill, FillState, TailReader
from proxy.reference import Digest
from proxy.results import BlobReader, CacheOutcome, FillingBlob, StoredBlob
from proxy.routing import Route
from proxy.singleflight import KeyedLocks
from proxy.storage import BlobWriter, Staging, Store

log = logging.getLogger("regproxy.pullthrough")


class Fills:
    """The fills of ``store``, staged in ``staging``'s ``tmp/``."""

    def __init__(self, store: Store, staging: Staging, coordination: Coordination, *,
                 before_fill: Callable[[], None] | None = None) -> None:
        self._store = store
        self._staging = staging
        self._coordination = coordination
        self._running: dict[str, BlobFill] = {}
        self._claiming = KeyedLocks()  #: one claim at a time per blob
        #: Fills other replicas run: digest -> (holder, until when to believe it).
        self._holders: BoundedDict[str, tuple[Holder, float]] = BoundedDict(10_000)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Called before a new fill; raises to refuse it (the free-space watermark).
        self.before_fill = before_fill
        #: Called after each fill that published its blob (set at wiring: the evictor
        #: checks the budget).
        self.on_filled: Callable[[], None] | None = None

    def running_size(self, digest: Digest) -> int | None:
        """The size a fill of ``digest`` in this process announced, if one runs."""
        fill = self._running.get(str(digest))
        return None if fill is None else fill.size

    async def wait_ended(self, digest: Digest) -> None:
        """Wait until the fill of ``digest`` this process runs (if one does) has ended,
        without reading its bytes: what a prefetch holds its slot for."""
        fill = self._running.get(str(digest))
        while fill is not None and not fill.ended:
            await fill.wait_progress()

    def in_flight(self) -> list[tuple[Digest, int | None, int]]:
        """The fills this process runs: ``(digest, size announced, bytes so far)`` (read
        only: the console's storage page)."""
        return [(f.digest, f.size, f.written) for f in self._running.values() if not f.ended]

    async def get(self, route: Route, digest: Digest, *, size: int | None = None
                  ) -> StoredBlob | FillingBlob:
        """The blob's bytes for one client: a running fill joined, or a new one started;
        stored, when it was published meanwhile. ``size`` is the blob's size when it is
        known before the fill (a manifest's descriptor, the confirming HEAD): a new fill
        may then ask its first GET for part 0 only."""
        key = str(digest)
        fill = self._running.get(key)
        if fill is not None:
            return await _join(fill, CacheOutcome.COALESCED)
        if self.before_fill is not None:
            self.before_fill()
        patience = self._coordination.patience
        deadline = time.monotonic() + patience
        while True:
            async with self._claiming.hold(key):
                found = await self._claim_or_join(route, digest, size)
            if not isinstance(found, Holder):
                return found
            remote = await self._remote(route, digest, found)  # outside the lock: in parallel
            if remote is not None:
                return remote
            self._holders.pop(key, None)  # it finished, or died: look again
            size = await self._store.blob_size(digest)
            if size is not None:
                return StoredBlob(digest, size, CacheOutcome.HIT)
            if time.monotonic() > deadline:
                # a live holder (it keeps renewing its lease) that this replica cannot
                # reach: a wrong cluster.advertise_url, or a network split. Serving the
                # client beats single flight: fill here too, without the lease.
                writer = self._staging.claim_fill(digest)
                if writer is None:
                    raise Unavailable(f"could not start or join a fill of {digest}")
                log.warning("fill holder %s of %s unreachable for %.0f s; filling here too",
                            found.url, digest, patience)
                return await _join(self._start(route, digest, writer, SOLE, size),
                                   CacheOutcome.MISS)
            await asyncio.sleep(0.1)

    async def _claim_or_join(self, route: Route, digest: Digest, size_hint: int | None
                             ) -> StoredBlob | FillingBlob | Holder:
        """Start the fill, or join whoever runs it: this process, a sibling worker on this
        host, or (returned) another replica. Retried a few times: a fill can end between
        two looks."""
        key, delay = str(digest), 0.01
        for _ in range(8):
            fill = self._running.get(key)
            if fill is not None:
                return await _join(fill, CacheOutcome.COALESCED)
            known = self._holders.get(key)
            if known is not None and known[1] > time.monotonic():
                return known[0]  # learnt by an earlier client: no Redis round trip
            writer = self._staging.claim_fill(digest)
            if writer is not None:
                size = await self._store.blob_size(digest)
                if size is not None:  # a sibling published it just before our claim
                    writer.abort()
                    return StoredBlob(digest, size, CacheOutcome.HIT)
                lease = await self._coordination.claim_fill(digest)
                if isinstance(lease, Holder):  # another replica is filling it
                    writer.abort()
                    self._holders[key] = (lease, time.monotonic() + 1.0)
                    return lease
                if lease.look_again:
                    size = await self._store.blob_size(digest)
                    if size is not None:
                        writer.abort()
                        await lease.release()
                        return StoredBlob(digest, size, CacheOutcome.HIT)
                return await _join(self._start(route, digest, writer, lease, size_hint),
                                   CacheOutcome.MISS)
            tail = await TailReader.open(self._staging, self._store, digest)  # a sibling worker
            if tail is not None:
                return FillingBlob(digest, tail.size, tail, CacheOutcome.COALESCED)
            size = await self._store.blob_size(digest)
            if size is not None:  # it finished meanwhile
                return StoredBlob(digest, size, CacheOutcome.HIT)
            await asyncio.sleep(delay)
            delay *= 2
        raise Unavailable(f"could not start or join a fill of {digest}")

    async def local(self, digest: Digest) -> FillingBlob | None:
        """A fill of ``digest`` running in this process or a sibling worker, to serve
        another replica from (the cluster's internal endpoint)."""
        fill = self._running.get(str(digest))
        if fill is not None:
            return await _join(fill, CacheOutcome.COALESCED)
        tail = await TailReader.open(self._staging, self._store, digest)
        return None if tail is None else FillingBlob(digest, tail.size, tail,
                                                     CacheOutcome.COALESCED)

    async def _remote(self, route: Route, digest: Digest, holder: Holder) -> FillingBlob | None:
        async def reopen(start: int, end: int | None) -> AsyncIterator[bytes]:
            size = await self._store.blob_size(digest)
            result = (StoredBlob(digest, size, CacheOutcome.HIT) if size is not None
                      else await self.get(route, digest))
            if isinstance(result, FillingBlob):
                return _closing(result.reader, start, end)
            return self._store.open_blob(digest, start, end)

        reader = await self._coordination.join(holder, digest, reopen)
        if reader is None:
            return None
        return FillingBlob(digest, reader.size, reader, CacheOutcome.COALESCED)

    def _start(self, route: Route, digest: Digest, writer: BlobWriter, lease: Lease,
               size: int | None) -> BlobFill:
        fill = BlobFill(digest, writer, self._store.fill_sink(digest), guard=lease.still_held,
                        expected_size=size)
        key = str(digest)
        self._running[key] = fill

        def settled(f: BlobFill) -> None:
            if self._running.get(key) is f:
                del self._running[key]
                if f.state is FillState.PUBLISHED and self.on_filled is not None:
                    self.on_filled()

        async def run() -> None:
            async with lease.kept():
                await fill.run(route.upstream_client, route.remote, settled)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def close(self) -> None:
        """Cancel running fills (their temp files are removed); fills whose content is
        already verified get a few seconds to publish it (an S3 commit) first."""
        if not self._tasks:
            return
        log.info("cancelling %d blob fill(s) from upstreams still running (their temp files "
                 "are removed; verified ones get 5 s to publish first)", len(self._tasks))
        if any(f.verified for f in self._running.values()):
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)


async def _join(fill: BlobFill, outcome: CacheOutcome) -> FillingBlob:
    reader = fill.reader()
    try:
        size = await fill.wait_headers()
    except BaseException:
        reader.close()
        raise
    return FillingBlob(fill.digest, size, reader, outcome)


async def _closing(reader: BlobReader, start: int, end: int | None) -> AsyncIterator[bytes]:
    try:
        async for chunk in reader.stream(start, end):
            yield chunk
    finally:
        reader.close()
