"""Parallel ranged fills: a big blob fetched as several ranged GETs at once.

The fill's first GET (no ``Range``) tells the size and whether the upstream takes ranges
(``Accept-Ranges: bytes``); it stays the first part and the other parts are asked with
``Range`` at the same time. When the size is known before it (a prefetch has it from the
manifest), the first GET asks for part 0's range itself, so no byte past that part is in
flight when it ends. When the first GET was redirected off the upstream's origin (a
blob CDN's signed URL), the parts and their retries go straight to that URL, without
credentials, instead of asking the registry for a redirect each; a CDN that refuses (the
URL expired) makes the parts ask the registry again, as they do without one. Each part is
written at its offset of the fill file (``pwrite``, in a thread); the digest is fed in
order by hashing the contiguous written prefix as it grows, and only that prefix is
announced to readers (in process, and to sibling workers through the ``.prefix`` hint).
A part that fails is asked again from where it stopped, a few times; an upstream that
answers a ``Range`` with 200 makes the first GET run to the end (one stream, no byte
fetched twice once that is known).

Under an upstream's caps (``[upstreams.<name>.limits]``) a fill holds one slot per request
it has in flight (:class:`PartSlots`): its first GET's slot, waited for like any request,
and one for each extra part, taken only if free right now and no one waits in line. It
never waits for a slot while holding one, so fills cannot starve each other; an idle
upstream gets every part, a busy one fewer, a full one a single stream. A part's retries
reuse its slot, and each slot is given back once, when its part ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy import metrics
from proxy.config import UpstreamConfig
from proxy.errors import BadGateway, BlobUnknown, RegistryError, Unavailable
from proxy.reference import Digest
from proxy.storage import BlobWriter
from proxy.upstream import Endpoint, UpstreamClient, UpstreamResponse, upstream_error

log = logging.getLogger("regproxy.fill")

#: Times a failed part is asked again (from where it stopped) before the fill fails.
PART_RETRIES = 3
#: Received bytes written per ``pwrite`` hop (keeps memory flat: one batch per part).
BATCH = 1 << 20
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ranged")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class PartSlots:
    """The slots under an upstream's caps that one fill's requests hold, one per request in
    flight (each sent with ``slot_held``): the first waited for, the others only taken when
    free right now, so a fill never waits for a slot while it holds one. Every slot is
    given back exactly once: a part's by its task when it ends, the rest by :meth:`close`.
    Without caps the counting is the same and costs nothing."""

    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream
        self.held = 0

    async def take_first(self) -> None:
        """The first GET's slot, waiting in line like any request."""
        await self._upstream.acquire_slot()
        self.held += 1

    def take_free(self, n: int) -> int:
        """Up to ``n`` more slots, only those free now: how many were taken."""
        taken = self._upstream.try_acquire_slots(n)
        self.held += taken
        return taken

    def give_back(self) -> None:
        if self.held <= 0:
            raise RuntimeError("a fill gave back a slot it did not hold")
        self.held -= 1
        self._upstream.release_slot()

    def keep(self, n: int) -> None:
        """Give back all but ``n`` slots (those no part will use)."""
        while self.held > n:
            self.give_back()

    def close(self) -> None:
        self.keep(0)


def parts_wanted(config: UpstreamConfig, size: int | None, in_order_sink: bool) -> int:
    """How many parts a blob of ``size`` is worth (1: one stream): ranged fills are off, the
    blob is small or of unknown size, or the store needs the bytes in order (a sink: S3)."""
    count = config.parallel_fills
    if count < 2 or size is None or size < max(config.parallel_fill_threshold, count):
        return 1
    return 1 if in_order_sink else count


def split(size: int, count: int) -> list[tuple[int, int]] | None:
    """The ``[start, end)`` spans to fetch a blob of ``size`` in as ``count`` parts, or
    ``None`` for one stream (fewer than two)."""
    if count < 2:
        return None
    step = -(-size // count)
    return [(start, min(size, start + step)) for start in range(0, size, step)]


def plan_parts(config: UpstreamConfig, size: int | None, in_order_sink: bool,
               slots: PartSlots, headers: CIMultiDictProxy[str] | None = None
               ) -> list[tuple[int, int]] | None:
    """The spans to fetch a blob of ``size`` in, with as many parts as ``slots`` (which
    holds the first GET's slot) can take at once; ``None``: one stream. Asked either once
    the first (plain) GET's response ``headers`` told the size and whether the upstream
    takes ranges, or before the first GET when the size is known already (no ``headers``:
    that GET then asks for the first span, and its 206 tells)."""
    wanted = parts_wanted(config, size, in_order_sink)
    if size is None or wanted < 2:
        return None
    if headers is not None and headers.get("Accept-Ranges", "").strip().lower() != "bytes":
        metrics.child(metrics.RANGED_FALLBACKS, config.name).inc()
        return None
    slots.take_free(wanted - 1)
    spans = split(size, slots.held)
    slots.keep(1 if spans is None else len(spans))  # (a small blob may make fewer spans)
    return spans


@dataclass
class _Part:
    start: int
    end: int
    done: int = 0  #: bytes written from ``start``

    @property
    def complete(self) -> bool:
        return self.start + self.done >= self.end


class _RangesIgnored(Exception):
    """A ranged GET answered 200: the upstream sends whole blobs only."""


def content_range_is(resp: UpstreamResponse, first: int, last: int, size: int) -> bool:
    """Whether a 206 answers exactly the range asked, of a blob of ``size``."""
    m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    return m is not None and (int(m[1]), int(m[2])) == (first, last) and m[3] in ("*", str(size))


def check_content_range(resp: UpstreamResponse, first: int, last: int, size: int) -> None:
    """A 206 must answer exactly the range asked, of a blob of the size the fill knows."""
    if not content_range_is(resp, first, last, size):
        raise BadGateway("upstream answered a range with the wrong Content-Range")


class _Refused(Exception):
    """A redirect target gave no ranged answer (no answer, or a status other than 206 and
    200): its signed URL may have expired, so the registry is asked again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@asynccontextmanager
async def _ranged_get(upstream: UpstreamClient, remote: str, digest: Digest,
                      headers: dict[str, str], direct: URL | None, *, slot_held: bool = False
                      ) -> AsyncIterator[UpstreamResponse]:
    """A ranged blob GET: to ``direct`` (the fill's redirect target) when given, where
    anything but a 206 or a 200 raises :class:`_Refused` before yielding; else to the
    registry (which may redirect, as usual), any status yielded. ``slot_held``: the caller
    holds the slot under the caps (a fill's part)."""
    if direct is None:
        async with upstream.request("GET", remote, Endpoint.BLOBS, digest,
                                    headers=headers, slot_held=slot_held) as resp:
            yield resp
        return
    answered = False
    try:
        async with upstream.request_redirected(direct, headers, slot_held=slot_held) as resp:
            answered = True
            if resp.status not in (200, 206):
                raise _Refused(f"answered {resp.status}")
            yield resp
    except RegistryError as exc:
        if answered:
            raise  # (the body broke: an ordinary failure of the part)
        raise _Refused(exc.message) from None


async def fetch_range(upstream: UpstreamClient, remote: str, digest: Digest, start: int,
                      end: int, size: int, direct: URL | None = None) -> AsyncIterator[bytes]:
    """Bytes ``[start, end)`` of a blob with one ranged GET (a cold range that must not wait
    for its fill): to ``direct``, the fill's redirect target, when given, and to the
    registry if that refuses. Raises :class:`BadGateway` before yielding anything when the
    upstream does not answer the range with a 206 (the caller then waits for the fill),
    and when the body is short or too long. The bytes are not verified here."""
    headers = {"Range": f"bytes={start}-{end - 1}"}
    try:
        async for chunk in _fetch_range(upstream, remote, digest, start, end, size, headers,
                                        direct):
            yield chunk
        return
    except _Refused as exc:  # (raised before any byte was yielded)
        assert direct is not None
        log.info("cold range of %s: the redirect target %s %s; asking upstream %s again",
                 digest, direct.host, exc.reason, upstream.name)
    async for chunk in _fetch_range(upstream, remote, digest, start, end, size, headers, None):
        yield chunk


async def _fetch_range(upstream: UpstreamClient, remote: str, digest: Digest, start: int,
                       end: int, size: int, headers: dict[str, str], direct: URL | None
                       ) -> AsyncIterator[bytes]:
    async with _ranged_get(upstream, remote, digest, headers, direct) as resp:
        if resp.status == 200:
            raise BadGateway("upstream ignores ranges")
        if resp.status != 206:
            raise upstream_error(resp, upstream, f"blob {digest}", BlobUnknown)
        check_content_range(resp, start, end - 1, size)
        metrics.child(metrics.COLD_RANGES, upstream.name).inc()
        got = 0
        while got < end - start:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise Unavailable(f"upstream {upstream.name} failed: "
                                  f"{type(exc).__name__}") from None
            if not chunk:
                raise BadGateway("upstream closed a ranged body early")
            if got + len(chunk) > end - start:
                raise BadGateway("upstream sent more bytes than the range asked")
            got += len(chunk)
            yield chunk


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in the pool; a cancelled caller still waits for the thread to finish (the
    file must not go while it is written or read)."""
    fut = asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


class RangedFill:
    """Fetches one blob in parts into ``writer``; ``advance(n)`` is told each time the
    contiguous written prefix grows by ``n`` bytes. ``slots`` holds one slot per span (the
    first GET's, which the caller's request holds, and one per other part, which each
    part's task gives back when it ends); every request of the parts is sent under them."""

    def __init__(self, upstream: UpstreamClient, remote: str, digest: Digest,
                 writer: BlobWriter, spans: list[tuple[int, int]], size: int,
                 advance: Callable[[int], None], slots: PartSlots, *,
                 first_ranged: bool = False, direct: URL | None = None) -> None:
        if slots.held != len(spans):
            raise AssertionError(f"{len(spans)} parts under {slots.held} slots")
        self._upstream = upstream
        self._slots = slots
        #: Where the first GET was redirected off the upstream's origin (a blob CDN): the
        #: parts are asked there until it refuses once (``None``: ask the registry).
        self._direct = direct
        self._remote = remote
        self._digest = digest
        self._writer = writer
        self._parts = [_Part(start, end) for start, end in spans]
        self._size = size
        self._advance = advance
        self._prefix = 0  #: contiguous bytes written from 0
        self._grew = asyncio.Event()
        self._decided = asyncio.Event()  #: every ranged part answered 206, or one 200
        #: The first GET asked for part 0's range itself (the size was known before it): it
        #: ends at its span, with no bytes past it in flight, and cannot take over.
        self._first_ranged = first_ranged
        self._unanswered = len(spans) - 1
        self._one_stream = False
        self._span0 = spans[0][1]  #: where the first GET stops, unless it takes over
        self._crossed = False
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, first: UpstreamResponse) -> None:
        """Fetch every part (the first from ``first``) and hash the whole blob in order."""
        if self._unanswered == 0 or self._first_ranged:
            self._decided.set()
        hasher = asyncio.create_task(self._hash())
        self._tasks = [asyncio.create_task(self._first(first)), hasher]
        self._tasks += [asyncio.create_task(self._part(p)) for p in self._parts[1:]]
        try:
            pending = set(self._tasks)
            while pending - {hasher}:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:  # (only a fallback cancels a part)
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            if self._prefix < self._size:  # (no part is left to fill the gap)
                raise BadGateway("upstream parts left a gap in the blob")
            await hasher
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the parts ---------------------------------------------------------------------

    async def _first(self, resp: UpstreamResponse) -> None:
        """Part 0 from the fill's first response; it runs to the end of the blob when the
        upstream turns out to ignore ranges."""
        part = self._parts[0]
        try:
            await self._stream_first(resp, part)
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp.close()
            await self._retry_rest(part, Unavailable(
                f"upstream {self._upstream.name} failed: {type(exc).__name__}"))
            return
        if not self._first_ranged:
            resp.close()  # the other parts bring the rest: drop this connection now
        if not part.complete:
            await self._retry_rest(part, BadGateway("upstream closed the blob body early"))

    async def _stream_first(self, resp: UpstreamResponse, part: _Part) -> None:
        batch: list[bytes] = []
        held = 0
        while not part.complete:
            chunk = await self._read(resp, part, batch, held)
            if not chunk:
                break
            if not self._crossed and part.start + part.done + held + len(chunk) >= self._span0:
                await self._decided.wait()  # before the span ends: stop, or take over?
                if self._one_stream and len(self._tasks) > 2:  # no late write of a part
                    await asyncio.wait(self._tasks[2:])
                self._crossed = True
            room = part.end - (part.start + part.done + held)
            if len(chunk) > room:
                if part.end == self._size:
                    raise BadGateway("upstream sent more bytes than announced")
                chunk = chunk[:room]
            batch.append(chunk)
            held += len(chunk)
            if held >= BATCH or part.start + part.done + held >= part.end:
                await self._write(part, batch, held)
                batch, held = [], 0
        if batch:
            await self._write(part, batch, held)

    async def _part(self, part: _Part) -> None:
        """A part other than the first, under its own slot, given back when it ends (a
        task cancelled before it started leaves its slot to :meth:`PartSlots.close`)."""
        try:
            await self._ranged(part)
        finally:
            self._slots.give_back()

    async def _retry_rest(self, part: _Part, error: RegistryError) -> None:
        """The first GET broke before its span was in: ask the rest with a range."""
        if self._one_stream:
            raise error  # the upstream takes no ranges: nothing to resume with
        await self._ranged(part, error)

    async def _ranged(self, part: _Part, error: RegistryError | None = None) -> None:
        """Fetch what ``part`` still lacks with ranged GETs, retried a few times."""
        attempts = 0 if error is None else 1
        while True:
            if attempts > PART_RETRIES:
                assert error is not None
                raise error
            if attempts:
                metrics.child(metrics.RANGED_RETRIES, self._upstream.name).inc()
                log.warning("blob fill %s: part at %d failed (%s); asking again", self._digest,
                            part.start, error.message if error else "")
                await asyncio.sleep(0.05 * attempts)
            attempts += 1
            try:
                await self._fetch(part)
                return
            except _RangesIgnored:
                if self._decided.is_set() or part is self._parts[0]:  # no stream to take over
                    raise BadGateway("upstream stopped honouring ranges mid-fill") from None
                self._fall_back()
                return
            except RegistryError as exc:  # the upstream's fault, or the connection's
                error = exc

    async def _fetch(self, part: _Part) -> None:
        """One ranged GET of what ``part`` lacks: to the redirect target while there is one
        (it refusing costs no retry: the registry is asked at once, and for every part
        from then on), else to the registry."""
        direct = self._direct
        if direct is not None:
            try:
                await self._fetch_from(part, direct)
                return
            except _Refused as exc:
                if self._direct is not None:  # (once, whichever part saw it first)
                    log.warning("blob fill %s: the redirect target %s %s; asking upstream %s "
                                "for the parts again", self._digest, direct.host, exc.reason,
                                self._upstream.name)
                    self._direct = None
        await self._fetch_from(part, None)

    async def _fetch_from(self, part: _Part, direct: URL | None) -> None:
        first, last = part.start + part.done, part.end - 1
        headers = {"Range": f"bytes={first}-{last}"}
        async with _ranged_get(self._upstream, self._remote, self._digest, headers,
                               direct, slot_held=True) as resp:
            if resp.status == 200:
                raise _RangesIgnored()
            if resp.status != 206:
                raise upstream_error(resp, self._upstream, f"blob {self._digest}", BlobUnknown)
            check_content_range(resp, first, last, self._size)
            metrics.child(metrics.RANGED_PARTS, self._upstream.name).inc()
            if part is not self._parts[0]:  # (the first part's own retry decides nothing)
                self._answered()
            batch: list[bytes] = []
            held = 0
            while True:
                chunk = await self._read(resp, part, batch, held)
                if not chunk:
                    break
                if part.done + held + len(chunk) > part.end - part.start:
                    raise BadGateway("upstream sent more bytes than the range asked")
                batch.append(chunk)
                held += len(chunk)
                if held >= BATCH:
                    await self._write(part, batch, held)
                    batch, held = [], 0
            if batch:
                await self._write(part, batch, held)
        if not part.complete:
            raise BadGateway("upstream closed a ranged body early")

    async def _read(self, resp: UpstreamResponse, part: _Part, batch: list[bytes],
                    held: int) -> bytes:
        """The next chunk of ``resp``; when the body breaks, what was received is written
        first, so the retry asks only for the rest."""
        try:
            return await self._upstream.read_any(resp)  # (within the bandwidth cap)
        except (aiohttp.ClientError, TimeoutError):
            if batch:
                await self._write(part, batch, held)
            raise

    def _answered(self) -> None:
        if not self._decided.is_set():
            self._unanswered -= 1
            if self._unanswered <= 0:
                self._decided.set()

    def _fall_back(self) -> None:
        """The upstream ignores ranges: the first GET brings everything, the other parts
        stop (what they wrote is written again with the same bytes, and hashed once)."""
        log.warning("upstream %s ignores ranges; filling %s as one stream",
                    self._upstream.name, self._digest)
        metrics.child(metrics.RANGED_FALLBACKS, self._upstream.name).inc()
        self._one_stream = True
        self._parts[1:] = []
        self._parts[0].end = self._size
        for task in self._tasks[2:]:
            if task is not asyncio.current_task():
                task.cancel()
        self._decided.set()

    # -- writing and hashing -----------------------------------------------------------

    async def _write(self, part: _Part, batch: list[bytes], n: int) -> None:
        await _in_thread(self._writer.write_at, batch, part.start + part.done)
        part.done += n
        prefix = 0
        for p in self._parts:
            prefix = p.start + p.done
            if not p.complete:
                break
        if prefix > self._prefix:
            grown, self._prefix = prefix - self._prefix, prefix
            self._writer.announce_prefix(prefix)
            self._advance(grown)
            self._grew.set()

    async def _hash(self) -> None:
        """Feed the digest the contiguous prefix, in order, as it grows."""
        hashed = 0
        while hashed < self._size:
            while self._prefix <= hashed:
                self._grew.clear()
                await self._grew.wait()
            target = self._prefix
            await _in_thread(self._writer.absorb, target)
            hashed = target

