"""The answer to a blob GET or HEAD: handlers describe the body, :class:`BlobResponse` sends it.

A body is a :class:`~proxy.results.LocalSpan` of a stored file, the
:class:`LocalSpans` of a file still being written, a :class:`ByteStream`, or a
:class:`Redirect`. The response owns everything between that description and the socket,
as aiohttp's ``FileResponse`` does in its ``prepare`` (which is not used: it opens and closes
files in threads, and those two thread hops made a warm 4 KiB blob cost ~0.7 ms of CPU
instead of ~0.25 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from aiohttp import ClientConnectionResetError, web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import BadGateway, RegistryError, StorageFailed
from proxy.handlers.common import CACHE_OUTCOME, ERROR
from proxy.handlers.ranges import parse_range
from proxy.pullthrough.fill import read_spans
from proxy.results import CacheOutcome, LocalSpan, SpanSource

log = logging.getLogger("regproxy.http")


class LocalSpans(NamedTuple):
    """A local file still being written: ``source(start, end)`` yields its spans as they
    may be sent (a fill reader's :attr:`~proxy.results.BlobReader.local_spans`), and bytes
    not in the file yet (a cold range, from the upstream) as ``bytes``."""

    source: SpanSource


class ByteStream(NamedTuple):
    """Bytes from elsewhere: ``source(start, end)`` yields bytes ``[start, end)``."""

    source: Callable[[int, int | None], AsyncIterator[bytes]]


class Redirect(NamedTuple):
    """The bytes are fetched from ``url`` (a presigned object-store URL): 307."""

    url: str


#: What a blob answer sends; ``None`` for a HEAD, which sends none.
Body = LocalSpan | LocalSpans | ByteStream | Redirect

#: When the client's socket is full, this much goes through the transport (a copy) while
#: it drains; then ``sendfile`` takes over again.
_SPILL = 64 << 10
#: Bytes per ``sendfile`` call before the loop gets a turn.
_SENDFILE_MAX = 4 << 20


class BlobResponse(web.StreamResponse):
    """A blob's answer: conditional requests, ``Range``, HEAD, and the body sent the
    cheapest way the connection allows, all in :meth:`prepare`.

    * ``If-None-Match`` naming the ``ETag`` of ``headers`` (the digest): 304.
    * ``Range`` (when ``size`` is known): 206 with ``Content-Range``; an unsatisfiable one
      raises the OCI 416 before anything is sent. ``size=None`` sends a chunked body.
    * Local files go with ``os.sendfile`` on plain TCP (a stored one corked, so the
      headers and the file leave in full segments), ``pread`` and write on TLS and for
      chunked bodies.
    * An error once the headers are out cuts the connection: the client sees a short body
      and retries instead of trusting it; the access log gets the outcome and why.

    It relies on its sources for integrity: a :class:`LocalSpans` source must not yield
    the last byte of ``[start, end)`` before the blob is verified (the fill readers hold it
    back), so a corrupt or truncated upstream body never looks complete to a client.

    Handlers call :meth:`send` (not return the response unprepared) so that a 416 still
    becomes its OCI error and the body's file or reader can be released afterwards.
    """

    def __init__(self, headers: dict[str, str], size: int | None, body: Body | None) -> None:
        super().__init__(headers=headers)
        self._blob_size = size
        self._blob_body = body

    async def send(self, request: web.Request) -> BlobResponse:
        """Prepare (which sends everything) and return the response, for the handler."""
        await self.prepare(request)
        return self

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:  # (aiohttp calls it again once the handler returned)
            return await super().prepare(request)
        etag = self.headers.get("ETag")
        if etag is not None and etag in request.headers.get("If-None-Match", ""):
            self.set_status(304)
            return await self._empty(request)
        size, body = self._blob_size, self._blob_body
        rng = None if size is None else parse_range(request.headers.get("Range"), size)
        if request.method == "HEAD":
            if size is not None:
                self.content_length = size  # the real length, without a body
            return await self._empty(request)
        if isinstance(body, Redirect):
            self.set_status(307)
            self.headers["Location"] = body.url
            self.content_length = 0
            return await self._empty(request)
        assert body is not None, "a GET needs a body"
        start, end = 0, size
        if rng is not None:
            start, end = rng
            self.set_status(206)
            self.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if end is not None:
            self.content_length = end - start
        sock = _plain_socket(request)  #: ``None`` on TLS: read and written
        if isinstance(body, LocalSpan):
            assert end is not None  # (a stored file has a size)
            span = LocalSpan(body.fd, body.offset + start, end - start)
            if sock is None:
                return await self._send(request, read_spans(_one(span)))
            return await self._send_corked(request, sock, span)
        if isinstance(body, LocalSpans):
            spans = body.source(start, end)
            if sock is None or size is None:  # (a chunked body needs framing: copy it)
                return await self._send(request, read_spans(spans))
            return await self._send(request, spans)
        return await self._send(request, body.source(start, end))

    async def _empty(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        await self.write_eof()
        return writer

    async def _send_corked(self, request: web.BaseRequest, sock: socket.socket,
                           span: LocalSpan) -> AbstractStreamWriter | None:
        """A stored file with TCP_CORK (nginx's tcp_nopush): the headers and the file leave
        in full segments, +25 % for one client on loopback; uncorked at the end so that the
        tail goes at once."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return await self._send(request, span)
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    async def _send(self, request: web.BaseRequest,
                    items: LocalSpan | AsyncIterator[bytes] | AsyncIterator[LocalSpan | bytes],
                    ) -> AbstractStreamWriter | None:
        """Send the headers, then ``items``: spans of a file (with ``sendfile``), or bytes.
        An error from here on cuts the connection."""
        writer = await super().prepare(request)
        assert writer is not None  # (a fresh response's first prepare)
        out: int | None = None  #: the client's socket, once the first span is to be sent
        try:
            if isinstance(items, LocalSpan):
                out = self._start_sendfile(request, writer)
                await self._send_span(request, writer, out, items)
            else:
                async for item in items:
                    if not isinstance(item, LocalSpan):
                        await self.write(item)
                        continue
                    if out is None:
                        out = self._start_sendfile(request, writer)
                    await self._send_span(request, writer, out, item)
            if out is not None and request.transport is not None:
                request.transport.set_write_buffer_limits()  # back to the defaults
        except Exception as exc:
            self._cut(request, exc)
            return writer
        await self.write_eof()
        return writer

    def _start_sendfile(self, request: web.BaseRequest, writer: AbstractStreamWriter) -> int:
        """Flush the headers (aiohttp holds them back for the first write) and make the
        transport wake writers only once it is empty (see :meth:`_send_span`); returns the
        client's socket descriptor."""
        sock = _plain_socket(request)
        if sock is None or request.transport is None:
            raise ConnectionResetError("client connection lost")
        writer.send_headers()
        request.transport.set_write_buffer_limits(high=0)
        return sock.fileno()

    async def _send_span(self, request: web.BaseRequest, writer: AbstractStreamWriter,
                         out: int, span: LocalSpan) -> None:
        """Send a span of a file with ``sendfile`` straight from the page cache: no copy
        through Python, so the clients tailing one fill cost little more than one.
        asyncio's ``loop.sendfile`` costs too much per call for spans of a chunk or two,
        so this calls ``os.sendfile`` while the transport has nothing queued; when the
        socket is full it queues a little through the transport, whose write limit of 0
        wakes us only once all of it is out."""
        transport = request.transport
        assert transport is not None
        pos, end = span.offset, span.offset + span.length
        while pos < end:
            # (no await between this check and sendfile: a closed transport's descriptor
            # number may already belong to another socket or file)
            if transport.is_closing() or request.transport is not transport:
                raise ConnectionResetError("client connection closed")
            if transport.get_write_buffer_size() == 0:
                try:
                    sent = os.sendfile(out, span.fd, pos, min(end - pos, _SENDFILE_MAX))
                except BlockingIOError:
                    sent = -1
                if sent == 0:
                    raise BadGateway("blob file shrank while being read")
                if sent > 0:
                    pos += sent
                    writer.output_size += sent  # (what the access log reports)
                    if pos < end:
                        await asyncio.sleep(0)  # a fast client must not hold the loop for long
                    continue
            data = os.pread(span.fd, min(end - pos, _SPILL), pos)
            if not data:
                raise BadGateway("blob file shrank while being read")
            await self.write(data)
            await writer.drain()
            pos += len(data)

    def _cut(self, request: web.BaseRequest, exc: Exception) -> None:
        """The headers are gone: the only honest signal left is to cut the connection, so
        the client sees a short body and retries instead of trusting it (or waiting for
        bytes that will never come)."""
        if isinstance(exc, ConnectionError | ClientConnectionResetError):
            # the client's doing: the request keeps its cache outcome (a hit stays one)
            log.info("client %s left during %s", request.remote, request.path)
        else:
            if isinstance(exc, RegistryError):
                log.warning("aborting %s for %s: %s", request.path, request.remote,
                            exc.message)
            else:
                log.exception("aborting %s for %s", request.path, request.remote)
            # (a full disk is this proxy's trouble, not the upstream's)
            request[CACHE_OUTCOME] = (CacheOutcome.ERROR if isinstance(exc, StorageFailed)
                                      else CacheOutcome.UPSTREAM_ERROR)
            request[ERROR] = "transfer cut: " + (exc.message if isinstance(exc, RegistryError)
                                                 else f"{type(exc).__name__}: {exc}")
        if request.transport is not None:
            request.transport.close()


async def _one(span: LocalSpan) -> AsyncIterator[LocalSpan]:
    if span.length > 0:
        yield span


def _plain_socket(request: web.BaseRequest) -> socket.socket | None:
    """The client's socket, when bytes may go to it with ``sendfile`` (no TLS)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock: socket.socket | None = transport.get_extra_info("socket")
    return sock
