"""One upstream blob download, shared by every client that wants the blob while it runs.

Within a process, readers of a fill are woken as bytes land (:class:`FillReader`). Other
worker processes on the same store find the fill's well-known temp file and tail it
(:class:`TailReader`), so single flight holds across workers too.

The fill runs in its own task and tees the upstream body into a temp file of the store,
hashing as it goes. Readers tail that file with ``pread`` as bytes arrive, so a joiner's
first byte comes as soon as the first chunk is on disk, and a client that hangs up does
not stop the fill. The last byte of every response (the blob's, or a range's) is only
handed out once the digest of the whole blob has been checked, so a corrupt or truncated
upstream body can never look complete to a client, whichever part of it was asked for.
A big blob may come as parallel ranged GETs (:mod:`proxy.pullthrough.ranged`): then the
bytes readers see are the contiguous prefix written so far, never a later part.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

from yarl import URL

from proxy import metrics
from proxy.errors import (
    BadGateway,
    BlobUnknown,
    DigestInvalid,
    RegistryError,
    SizeInvalid,
    Unavailable,
)
from proxy.pullthrough.ranged import (
    PartSlots,
    RangedFill,
    content_range_is,
    fetch_range,
    plan_parts,
)
from proxy.reference import Digest
from proxy.results import LocalSpan, SpanSource
from proxy.storage import BlobWriter, ObjectWriter, Staging, Store
from proxy.storage.failures import storage_failure
from proxy.upstream import Endpoint, UpstreamClient, UpstreamResponse, upstream_error

log = logging.getLogger("regproxy.fill")

#: Bytes handed to a reader per ``pread``; large chunks keep per-chunk overhead low.
READ_CHUNK = 1 << 20
#: Readers are woken when this much arrived, or this long after their last wake-up with
#: anything new (and at the end): 16 clients of one fill woken per 256 KiB socket read
#: cost more CPU than sending them the bytes, and a slow upstream must not delay them.
NOTIFY_STEP = 1 << 20
NOTIFY_DELAY = 0.005
#: Blobs at least this big are hashed and written in a thread in parallel with
#: receiving; small blobs stay inline, where the thread hops would cost more latency than
#: they save CPU.
PIPELINE_MIN_BLOB = 8 << 20
#: Received bytes held while the thread is still busy with the previous batch.
PIPELINE_MAX_BATCH = 8 << 20
_TEE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tee")
#: A client range starting at least this far beyond what its fill has written is a cold
#: range: it streams from its own upstream ranged GET at once instead of waiting for the
#: fill to get there (lazy-pulling snapshotters, containerd's parallel layer fetches).
COLD_RANGE_LEAD = 4 << 20
#: Longer ranges wait for the fill (a resumed download of the rest of a blob is not worth
#: fetching twice); containerd's parallel chunks are 8 MiB by default, snapshotters' less.
COLD_RANGE_MAX = 16 << 20


async def read_spans(spans: AsyncIterator[LocalSpan | bytes]) -> AsyncIterator[bytes]:
    """The bytes of ``spans``, read in chunks of at most :data:`READ_CHUNK` (for clients
    that cannot take ``sendfile``: TLS, chunked bodies, peers)."""
    async for span in spans:
        if isinstance(span, bytes):  # (a cold range's bytes, not in the file yet)
            yield span
            continue
        pos, end = span.offset, span.offset + span.length
        while pos < end:
            data = os.pread(span.fd, min(end - pos, READ_CHUNK), pos)
            if not data:
                raise BadGateway("blob file shrank while being read")
            pos += len(data)
            yield data


class FillState(Enum):
    """Where a fill stands. Readers only ask three questions of it: may the bytes be
    trusted (:attr:`BlobFill.verified`), did it fail before that (``FAILED``: its error
    goes to every reader), and has it ended (no more bytes will come)."""

    RECEIVING = "receiving"  #: the upstream's bytes are arriving; none trusted yet
    VERIFIED = "verified"  #: every byte is in and matches the digest; being published
    PUBLISHED = "published"  #: in the store
    FAILED = "failed"  #: failed before verification: nothing it wrote may be served
    UNPUBLISHED = "unpublished"  #: verified, but publishing failed: the bytes stay good


#: The legal transitions (a fill is created ``RECEIVING``).
TRANSITIONS: dict[FillState, frozenset[FillState]] = {
    FillState.RECEIVING: frozenset({FillState.VERIFIED, FillState.FAILED}),
    FillState.VERIFIED: frozenset({FillState.PUBLISHED, FillState.UNPUBLISHED}),
    FillState.PUBLISHED: frozenset(),
    FillState.FAILED: frozenset(),
    FillState.UNPUBLISHED: frozenset(),
}
_TRUSTED = frozenset({FillState.VERIFIED, FillState.PUBLISHED, FillState.UNPUBLISHED})
_ENDED = frozenset({FillState.PUBLISHED, FillState.FAILED, FillState.UNPUBLISHED})


class BlobFill:
    """A running upstream download of one blob into the store."""

    def __init__(self, digest: Digest, writer: BlobWriter, sink: ObjectWriter | None = None, *,
                 guard: Callable[[], Awaitable[bool]] | None = None,
                 expected_size: int | None = None) -> None:
        self.digest = digest
        #: The size known before the first GET (a manifest's descriptor, for a prefetch; the
        #: confirming HEAD, for a blob GET): a big blob's first GET then asks for part 0 only.
        self._expected = expected_size
        self._writer = writer  # its file exists from now on
        self._sink = sink
        self._guard = guard  #: the fencing check (cluster lease) before publishing
        self.size: int | None = None
        self.written = 0
        self.state = FillState.RECEIVING
        self.error: RegistryError | None = None  #: why it failed (``FAILED``, ``UNPUBLISHED``)
        self._headers = asyncio.Event()
        self._progress = asyncio.Event()
        self._tee: _Tee | None = None
        self._publishing: asyncio.Future[Path] | None = None  #: the thread renaming the file
        self._announced = 0  #: ``written`` when readers were last woken
        self._announced_at = 0.0  #: and when (monotonic)
        self._deferred: asyncio.TimerHandle | None = None  #: a wake-up still to come
        self._upstream: UpstreamClient | None = None  #: (for cold ranges, once it runs)
        self._remote = ""
        self._ranges = False  #: the upstream announced ``Accept-Ranges: bytes``
        #: where the first GET was redirected off the upstream's origin (a blob CDN's
        #: signed URL): the ranged parts and cold ranges ask it directly
        self._direct: URL | None = None

    @property
    def verified(self) -> bool:
        """Whether every byte is in and matches the digest (publishing may still fail:
        the bytes stay good)."""
        return self.state in _TRUSTED

    @property
    def ended(self) -> bool:
        """Whether no more bytes will come (published, or failed)."""
        return self.state in _ENDED

    def _enter(self, state: FillState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"fill of {self.digest}: {self.state.value} -> {state.value}")
        self.state = state

    def _fail(self, error: RegistryError) -> None:
        """Record why the fill ends here: a failure before verification, or of publishing
        (a fill already published keeps that state; its late error changes nothing)."""
        self.error = error
        if self.state is FillState.RECEIVING:
            self._enter(FillState.FAILED)
        elif self.state is FillState.VERIFIED:
            self._enter(FillState.UNPUBLISHED)

    # -- reader side -------------------------------------------------------------------

    def reader(self) -> FillReader:
        """A reader on the fill's file (renamed into the store, when publishing was quicker).
        Call it synchronously right after finding the fill in the registry."""
        try:
            return FillReader(self, self._writer.open_reader(self.digest))
        except FileNotFoundError:  # published, then evicted at once: ask again
            raise Unavailable(f"blob {self.digest} was evicted while being joined; retry") from None

    async def wait_headers(self) -> int | None:
        """Wait until the upstream answered and the first bytes are on disk (a reader has
        nothing to send before); return the blob size (``None`` if not sent). A fill that
        failed unverified raises its error, so a client that got nothing yet gets a status
        (a full disk: 503), not a cut connection."""
        await self._headers.wait()
        while self.written == 0 and self.state is FillState.RECEIVING:
            await self.wait_progress()
        if self.state is FillState.FAILED:
            raise self._failure()
        return self.size

    def cold(self, start: int, end: int | None) -> bool:
        """Whether ``[start, end)`` starts so far beyond what is written that it is fetched
        with its own upstream ranged GET (the fill itself goes on: still one full GET):
        at most :data:`COLD_RANGE_MAX` long, from an upstream that announced ranges."""
        return (self._upstream is not None and self._ranges and self.state is FillState.RECEIVING
                and self.size is not None and end is not None
                and 1 < end - start <= COLD_RANGE_MAX and start - self.written >= COLD_RANGE_LEAD)

    def _failure(self) -> RegistryError:
        assert self.error is not None
        return self.error

    async def wait_progress(self) -> None:
        """Wait for the next chunk, the verification, or the end of the fill."""
        await self._progress.wait()

    # -- writer side -------------------------------------------------------------------

    def _advance(self, n: int) -> None:
        self.written += n
        if (self.written - self._announced >= NOTIFY_STEP
                or time.monotonic() - self._announced_at >= NOTIFY_DELAY):
            self._notify()
        elif self._deferred is None:  # if nothing more comes soon, wake them anyway
            self._deferred = asyncio.get_running_loop().call_later(NOTIFY_DELAY, self._notify)

    def _notify(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        self._announced, self._announced_at = self.written, time.monotonic()
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def run(
        self, upstream: UpstreamClient, remote: str, on_settled: Callable[[BlobFill], None]
    ) -> None:
        """Download, verify, sync and publish. ``on_settled`` is called (synchronously)
        once the blob is in the store, or just before the temp file is removed."""
        writer = self._writer
        self._upstream, self._remote = upstream, remote
        in_flight = metrics.child(metrics.FILLS_IN_FLIGHT, upstream.name)
        in_flight.inc()
        try:
            writer.drop_prefix_hint()  # (a dead filler's: this fill may be written in order)
            # under caps the fill holds a slot per request in flight (PartSlots): its first
            # GET's, waited for, and its other parts', taken only when free right now
            slots = PartSlots(upstream)
            try:
                await slots.take_first()
                async with self._first_get(upstream, remote, slots) as (resp, spans):
                    self._direct = upstream.redirect_target(resp)
                    if spans is not None:
                        writer.announce_prefix(0)  # before the size: tailers read the hint
                    else:
                        slots.keep(1)  # (parts planned for nothing: their slots go back)
                    writer.announce_size(self.size)
                    self._headers.set()
                    if spans is not None and self.size is not None:
                        await RangedFill(upstream, remote, self.digest, writer, spans,
                                         self.size, self._advance, slots,
                                         first_ranged=resp.status == 206,
                                         direct=self._direct).run(resp)
                    else:
                        await self._stream(upstream, resp, writer)
            finally:
                slots.close()
            try:
                writer.verify(self.digest, self.size)
            except (DigestInvalid, SizeInvalid) as exc:
                log.error("upstream %s sent bad content for %s: %s", upstream.name,
                          self.digest, exc.message)
                raise BadGateway(f"upstream content failed verification: {exc.message}") from None
            self._enter(FillState.VERIFIED)
            writer.announce_verified()
            metrics.child(metrics.UPSTREAM_BYTES, upstream.name).inc(self.written)
            self._notify()
            if self._guard is not None and not await self._guard():
                raise Unavailable("lost the fill lease to another replica; not publishing")
            if self._sink is not None:  # the object lives elsewhere: the temp file goes
                await self._sink.commit(self.digest, self.size)
                self._enter(FillState.PUBLISHED)
                on_settled(self)
                writer.abort()
                metrics.child(metrics.FILLS, upstream.name, "ok").inc()
                return
            # fsync, rename and directory fsync in one thread hop (a hop costs context
            # switches that showed in profiles of small-blob pulls); readers joining
            # meanwhile open the file at whichever path it has (BlobFill.reader)
            self._publishing = asyncio.get_running_loop().run_in_executor(
                None, writer.publish, self.digest)
            await asyncio.shield(self._publishing)
            self._enter(FillState.PUBLISHED)
            on_settled(self)  # once the blob is in the store: no moment where it is nowhere
            metrics.child(metrics.FILLS, upstream.name, "ok").inc()
        except BaseException as exc:
            metrics.child(metrics.FILLS, upstream.name, "cancelled" if isinstance(
                exc, asyncio.CancelledError) else "failed").inc()
            failed = storage_failure(exc)  # the disk's fault, not the upstream's
            if failed is not None:
                log.error("blob fill %s failed: %s", self.digest, failed.message)
            self._fail(failed or (exc if isinstance(exc, RegistryError) else Unavailable(
                f"blob fill failed: {type(exc).__name__}")))
            if failed is None and not isinstance(exc, RegistryError | asyncio.CancelledError):
                log.exception("blob fill %s failed", self.digest)
            if self._tee is not None:  # let the thread finish before the file goes
                await self._tee.stop()
            while self._publishing is not None and not self._publishing.done():
                with contextlib.suppress(BaseException):  # (it closes the file itself)
                    await asyncio.shield(self._publishing)
            on_settled(self)
            writer.abort()
            if self._sink is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._sink.abort())
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            in_flight.dec()
            self._headers.set()
            self._notify()

    @contextlib.asynccontextmanager
    async def _first_get(self, upstream: UpstreamClient, remote: str, slots: PartSlots
                         ) -> AsyncIterator[tuple[UpstreamResponse, list[tuple[int, int]] | None]]:
        """The fill's first GET and the ranged parts to fetch beside it (``None``: one
        stream). It runs to the end of the blob unless the size was known before it; then
        it asks for its own part, so no bytes past that are in flight when it stops. An
        upstream whose 206 names another size than the one known (a HEAD that lied) is
        asked again with a plain GET: the bytes decide, as the digest check does. Every
        GET is sent under the first of ``slots``; the parts are planned with as many more as
        are free: before the GET when the size is known, else once its answer told it."""
        expected = self._expected
        while True:
            slots.keep(1)  # (what a try before planned)
            known = plan_parts(upstream.config, expected, self._sink is not None, slots)
            headers = None if known is None else {"Range": f"bytes=0-{known[0][1] - 1}"}
            async with upstream.request("GET", remote, Endpoint.BLOBS, self.digest,
                                        headers=headers, slot_held=True) as resp:
                spans: list[tuple[int, int]] | None
                if resp.status == 206 and known is not None and expected is not None:
                    if not content_range_is(resp, 0, known[0][1] - 1, expected):
                        log.warning("upstream %s answered the first range of %s for another "
                                    "size than %d; asking for the whole blob", upstream.name,
                                    self.digest, expected)
                        expected = None
                        continue
                    self.size, self._ranges, spans = expected, True, known
                elif resp.status != 200:
                    raise upstream_error(resp, upstream, f"blob {self.digest}", BlobUnknown)
                else:  # (a range asked and answered 200: the upstream sends whole blobs)
                    if known is not None:
                        metrics.child(metrics.RANGED_FALLBACKS, upstream.name).inc()
                    self.size = resp.content_length
                    self._ranges = (resp.headers.get("Accept-Ranges", "").strip().lower()
                                    == "bytes" and known is None)
                    spans = None if known is not None else plan_parts(
                        upstream.config, self.size, self._sink is not None, slots, resp.headers)
                yield resp, spans
                return

    async def _stream(self, upstream: UpstreamClient, resp: UpstreamResponse,
                      writer: BlobWriter) -> None:
        """One stream, in order: the body teed into the file (and the sink)."""
        tee = _Tee(writer, self._advance, threaded=self.size is None
                   or self.size >= PIPELINE_MIN_BLOB)
        self._tee = tee
        while True:
            chunk, end_of_http_chunk = await upstream.read_chunk(resp)
            if not chunk:
                if not end_of_http_chunk:
                    break
                continue
            if self.size is not None and self.written + tee.held + len(chunk) > self.size:
                raise BadGateway("upstream sent more bytes than announced")
            await tee.add(chunk)
            if self._sink is not None:
                await self._sink.write(chunk)
        await tee.finish()


class _Tee:
    """Writes and hashes a fill's chunks in order, in a thread for big blobs.

    Pipeline: the thread hashes and writes batch N (hashlib and ``os.writev`` let go of
    the GIL) while the loop receives batch N+1, which grows while the thread is busy: one
    hop per batch, not per socket read, and no joining copy. A finished batch is
    announced, and the next one handed over, from the thread's done-callback, so bytes
    on disk reach readers even while the upstream stalls. Small blobs are written inline,
    where a thread hop costs more than it saves.
    """

    def __init__(self, writer: BlobWriter, advance: Callable[[int], None], *,
                 threaded: bool) -> None:
        self._writer = writer
        self._advance = advance
        self._threaded = threaded
        self._batch: list[bytes] = []
        self._batched = 0
        self._pending: asyncio.Future[None] | None = None
        self._pending_len = 0
        self._error: BaseException | None = None
        self._stopped = False

    @property
    def held(self) -> int:
        """Bytes received but not yet announced."""
        return self._pending_len + self._batched

    async def add(self, chunk: bytes) -> None:
        """Queue ``chunk``; waits only when :data:`PIPELINE_MAX_BATCH` is held already."""
        self._raise()
        if not self._threaded:
            self._writer.write_many([chunk])
            self._advance(len(chunk))
            return
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._pending is None:
            self._submit()
        while self._batched >= PIPELINE_MAX_BATCH and self._pending is not None:
            await self._wait()

    async def finish(self) -> None:
        """Write what is left; every byte is written and announced when this returns."""
        while self._pending is not None:
            await self._wait()
        self._raise()
        if self._batch:
            batch, n = self._batch, self._batched
            self._batch, self._batched = [], 0
            self._writer.write_many(batch)
            self._advance(n)

    async def stop(self) -> None:
        """Hand over nothing more and let the thread finish (the file is about to go)."""
        self._stopped = True
        while self._pending is not None:
            with contextlib.suppress(BaseException):
                await self._wait()

    async def _wait(self) -> None:
        """Wait for the batch in the thread, and settle it here if its done-callback is
        still queued (awaiting a done future does not yield to the loop, so waiting for
        the callback could spin forever)."""
        fut = self._pending
        assert fut is not None
        try:
            await asyncio.shield(fut)  # a cancelled fill must not close the file under the thread
        finally:
            if fut.done():
                self._done(fut)

    def _submit(self) -> None:
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(_TEE_POOL, self._writer.write_many, self._batch)
        self._pending.add_done_callback(self._done)
        self._pending_len = self._batched
        self._batch, self._batched = [], 0

    def _done(self, fut: asyncio.Future[None]) -> None:
        if self._pending is not fut:
            return  # settled already (by _wait, or this is the queued callback after it)
        self._pending = None
        error = RuntimeError("write cancelled") if fut.cancelled() else fut.exception()
        if error is not None:
            self._error = self._error or error
            return
        n, self._pending_len = self._pending_len, 0
        self._advance(n)
        if self._batch and not self._stopped and self._error is None:
            self._submit()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class FillReader:
    """One client's view of a fill: its own file descriptor, read with ``pread``."""

    def __init__(self, fill: BlobFill, fd: int) -> None:
        self.fill = fill
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def local_spans(self) -> SpanSource:
        """The spans a client's response sends (:meth:`client_spans`)."""
        return self.client_spans

    def stream(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` of the blob as they arrive.

        Raises the fill's error if the download fails before the range is complete.
        """
        return read_spans(self.spans(start, end))

    async def client_spans(self, start: int = 0, end: int | None = None
                           ) -> AsyncIterator[LocalSpan | bytes]:
        """:meth:`spans` for a client's response: a cold range's bytes come from the
        upstream at once (:meth:`_cold`), the rest as the fill brings it. (A peer resuming
        a stream, or the signature check, reads :meth:`stream`, which waits for the fill:
        the rest of a blob is not worth fetching twice.)"""
        pos = start
        if end is not None and self.fill.cold(start, end):
            sent = hashlib.sha256()
            async for chunk in self._cold(start, end):
                sent.update(chunk)
                pos += len(chunk)
                yield chunk
            if pos >= end:
                return  # (``unverified_ranges``: complete before the fill is verified)
            if pos > start:
                await self._match(start, pos, sent.hexdigest())
        async for span in self.spans(pos, end):
            yield span

    async def spans(self, start: int = 0, end: int | None = None) -> AsyncIterator[LocalSpan]:
        """Yield the parts of ``[start, end)`` that are on disk and may be sent, as they
        arrive (for ``sendfile``; :meth:`stream` reads them)."""
        fill, pos = self.fill, start
        while True:
            assert self._fd is not None, "reader closed"
            limit = end if end is not None else fill.size
            if limit is not None and pos >= limit:
                return
            if fill.state is FillState.FAILED:
                raise fill._failure()  # (verified bytes stay good even if publishing failed)
            avail = fill.written - pos
            if limit is not None:
                avail = min(avail, limit - pos)
            if avail > 0 and limit is not None and not fill.verified and pos + avail >= limit:
                avail -= 1  # keep the range's last byte back until the digest is checked
            if avail > 0:
                yield LocalSpan(self._fd, pos, avail)
                pos += avail
                continue
            if fill.size is None and fill.verified and fill.ended:
                return  # chunked upstream body: everything was written and verified
            await fill.wait_progress()

    async def _cold(self, start: int, end: int) -> AsyncIterator[bytes]:
        """A cold range's bytes from its own upstream GET, up to its last byte, which is
        held back for the fill to verify (:meth:`client_spans` sends it from the file),
        unless the upstream has ``unverified_ranges``. When the upstream will not answer
        the range, or its body breaks, this stops and the fill brings the rest."""
        fill = self.fill
        upstream = fill._upstream
        assert upstream is not None and fill.size is not None
        whole = upstream.config.unverified_ranges
        stop = end if whole else end - 1
        pos = start
        try:
            async for chunk in fetch_range(upstream, fill._remote, fill.digest, start, stop,
                                           fill.size, fill._direct):
                pos += len(chunk)
                yield chunk
        except RegistryError as exc:
            log.info("cold range %d-%d of %s from upstream %s stopped at %d (%s); the fill "
                     "brings the rest", start, end - 1, fill.digest, upstream.name, pos,
                     exc.message)

    async def _match(self, start: int, end: int, sent: str) -> None:
        """Once the fill is verified, check that the bytes ``[start, end)`` a cold range
        sent from its own GET (of SHA-256 ``sent``) are the verified ones: an upstream
        could answer a range with other bytes than the blob's. A mismatch, or a fill that
        failed, cuts the response before its last byte."""
        fill = self.fill
        while not fill.ended and not fill.verified:
            await fill.wait_progress()
        if not fill.verified:
            raise fill._failure()
        fd = self._fd
        assert fd is not None

        def digest_of_file() -> str:
            h, pos = hashlib.sha256(), start
            while pos < end:
                data = os.pread(fd, min(end - pos, READ_CHUNK), pos)
                if not data:
                    raise BadGateway("blob file shrank while being read")
                h.update(data)
                pos += len(data)
            return h.hexdigest()

        if await asyncio.get_running_loop().run_in_executor(_TEE_POOL, digest_of_file) != sent:
            log.error("upstream %s answered range %d-%d of %s with other bytes than the "
                      "verified blob", fill._upstream.name if fill._upstream else "?",
                      start, end - 1, fill.digest)
            raise BadGateway("upstream answered a range with bytes that failed verification")


class TailReader:
    """Tails a fill that another process (a sibling worker) is running.

    Progress is the file's size, polled with a short back-off; the blob is verified once
    its final path exists (the filler renames the file there), and the fill failed when
    the file is gone without a final blob or its filler no longer holds the lock.
    """

    def __init__(self, staging: Staging, store: Store, digest: Digest, fd: int,
                 size: int | None) -> None:
        self._staging = staging
        self._store = store
        self._digest = digest
        self._fd: int | None = fd
        self._seen_ok = False
        self.size = size
        #: a ranged fill's file grows out of order: its progress is the announced prefix
        self._prefix: int | None = staging.fill_prefix(digest)

    @classmethod
    async def open(cls, staging: Staging, store: Store, digest: Digest,
                   max_wait: float = 30.0) -> TailReader | None:
        """Join another process's fill; ``None`` when there is none (or it just ended)."""
        fd = staging.open_fill(digest)
        if fd is None:
            return None
        delay, waited = 0.001, 0.0
        while (size := staging.fill_size(digest)) is False:
            if not staging.filler_alive(fd) or waited > max_wait:
                os.close(fd)
                return None
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.02)
        return cls(staging, store, digest, fd, size if isinstance(size, int) else None)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _verified(self) -> bool:
        # sticky: on backends whose objects are not local files the hint goes with the
        # temp file once the object is published elsewhere
        self._seen_ok = self._seen_ok or self._staging.fill_verified(self._digest)
        return self._seen_ok

    def _written(self, verified: bool) -> int:
        """The bytes from the start that are written: the file's size, or (a ranged fill
        not yet verified) the prefix its filler announced (gone with the fill: no change)."""
        if self._prefix is None or verified:
            return os.fstat(self._fd).st_size if self._fd is not None else 0
        self._prefix = max(self._prefix, self._staging.fill_prefix(self._digest) or 0)
        return self._prefix

    @property
    def local_spans(self) -> SpanSource:
        return self.spans

    def stream(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` of the blob as the other process writes them."""
        return read_spans(self.spans(start, end))

    async def spans(self, start: int = 0, end: int | None = None
                    ) -> AsyncIterator[LocalSpan | bytes]:
        """Yield the parts of ``[start, end)`` that are on disk and may be sent."""
        pos, delay = start, 0.001
        while True:
            assert self._fd is not None, "reader closed"
            limit = end if end is not None else self.size
            if limit is not None and pos >= limit:
                return
            verified = self._verified()
            written = self._written(verified)
            avail = written - pos if limit is None else min(written, limit) - pos
            if avail > 0 and limit is not None and not verified and pos + avail >= limit:
                avail -= 1  # (as FillReader does)
            if avail > 0:
                yield LocalSpan(self._fd, pos, avail)
                pos += avail
                delay = 0.001
                continue
            if verified and self.size is None and pos >= written:
                return
            if not verified and not self._staging.filler_alive(self._fd):
                if self._verified() or await self._store.blob_size(self._digest) is not None:
                    self._seen_ok = True
                    continue  # published between the two checks
                raise Unavailable("the worker filling this blob failed; retry")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)
