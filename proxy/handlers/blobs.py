"""``/v2/<name>/blobs/<digest>``: GET and HEAD, cached (sendfile) or tailing a fill."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import ClientConnectionResetError, web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import BadGateway, RegistryError, StorageFailed, Unavailable
from proxy.handlers.common import CACHE_OUTCOME, ERROR, head_response, hosted_only, reader_of, route_of
from proxy.handlers.ranges import parse_range
from proxy.pullthrough.fill import FillReader, LocalSpan, TailReader, read_spans
from proxy.pullthrough.service import BlobResult
from proxy.reference import Digest

log = logging.getLogger("regproxy.http")


async def get_blob(request: web.Request) -> web.StreamResponse:
    """Serve a blob; Range requests get 206 whether the blob is stored or still arriving."""
    route = route_of(request)
    digest = Digest.parse(request.match_info["digest"])
    head = request.method == "HEAD"
    service = reader_of(request, route)
    etag = f'"{digest}"'  # content-addressed: the digest is the strongest validator
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "ETag": etag,
    }
    store = service.store
    for _ in range(3):  # a blob evicted between the lookup and the open is a miss: look again
        result = await service.blob(route, digest, head=head)
        request[CACHE_OUTCOME] = result.outcome
        # whether the bytes come off the store or from the upstream (`regproxy warm` counts it)
        headers["X-Cache"] = "hit" if result.stored else "miss"
        if not result.stored:
            break
        assert result.size is not None
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        rng = parse_range(request.headers.get("Range"), result.size)  # 416 as an OCI error
        if head:
            return head_response(headers, result.size)
        path = store.local_path(digest)
        if path is None:
            url = await store.redirect_url(digest)
            if url is not None:
                return web.Response(status=307, headers={**headers, "Location": url})
            return await stream_body(request, headers, result.size, rng,
                                     lambda s, e: store.open_blob(digest, s, e))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            return await send_file(request, headers, fd, result.size, rng)
        finally:
            os.close(fd)
    else:
        request[CACHE_OUTCOME] = "error"
        raise Unavailable(f"blob {digest} was evicted while being served; retry")
    if result.reader is None:  # HEAD answered from upstream
        return head_response(headers, result.size)
    return await stream_reader(request, headers, result)


async def send_file(request: web.Request, headers: dict[str, str], fd: int, size: int,
                    rng: tuple[int, int] | None) -> web.StreamResponse:
    """Send a stored blob from its open file, with ``sendfile`` on plain TCP. (aiohttp's
    ``FileResponse`` opens and closes the file in threads: those two thread hops made a
    warm 4 KiB blob cost ~0.7 ms of CPU, ~0.25 ms without them.)"""
    async def spans(start: int, end: int | None) -> AsyncIterator[LocalSpan]:
        stop = size if end is None else end
        if stop > start:
            yield LocalSpan(fd, start, stop - start)

    sock = _plain_socket(request)
    if sock is None:  # TLS: read and written
        return await stream_body(request, headers, size, rng,
                                 lambda start, end: read_spans(spans(start, end)))
    # TCP_CORK (nginx's tcp_nopush): the headers and the file leave in full segments,
    # +25 % for one client on loopback; uncorked at the end so that the tail goes at once
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    try:
        return await stream_body(request, headers, size, rng, spans)
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


async def stream_reader(request: web.Request, headers: dict[str, str], result: BlobResult
                        ) -> web.StreamResponse:
    """Send a blob still being filled (``result.reader``), honouring ``Range``; the reader
    is closed whatever happens. Readers of a local file hand out file spans, sent with
    ``sendfile`` on plain TCP, read and written otherwise (TLS, peers' streams)."""
    reader = result.reader
    assert reader is not None
    try:
        rng = None if result.size is None else parse_range(request.headers.get("Range"),
                                                           result.size)
        source: Callable[[int, int | None], AsyncIterator[bytes | LocalSpan]] = reader.stream
        if (result.size is not None  # (a chunked body needs framing: stream it)
                and isinstance(reader, FillReader | TailReader)
                and _plain_socket(request) is not None):
            source = reader.spans
        return await stream_body(request, headers, result.size, rng, source)
    finally:
        reader.close()


def _plain_socket(request: web.Request) -> socket.socket | None:
    """The client's socket, when bytes may go to it with ``sendfile`` (no TLS)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock: socket.socket | None = transport.get_extra_info("socket")
    return sock


async def stream_body(request: web.Request, headers: dict[str, str], size: int | None,
                      rng: tuple[int, int] | None,
                      source: Callable[[int, int | None], AsyncIterator[bytes | LocalSpan]],
                      ) -> web.StreamResponse:
    """Send ``source(start, end)`` as the body (206 for a range): bytes, or spans of a file
    (see :func:`_send_span`). An error once the headers are out cuts the connection: the
    client sees a short body and retries."""
    start, end, status = 0, size, 200
    if rng is not None and size is not None:
        start, end = rng
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    if end is not None:
        resp.content_length = end - start
    writer = await resp.prepare(request)
    assert writer is not None  # (a fresh response's first prepare)
    if request.method != "HEAD":
        out: int | None = None  #: the client's socket, once the first span is to be sent
        try:
            async for item in source(start, end):
                if not isinstance(item, LocalSpan):
                    await resp.write(item)
                    continue
                if out is None:
                    sock = _plain_socket(request)
                    if sock is None or request.transport is None:
                        raise ConnectionResetError("client connection lost")
                    out = sock.fileno()
                    writer.send_headers()  # (aiohttp holds them back for the first write)
                    request.transport.set_write_buffer_limits(high=0)  # see _send_span
                await _send_span(request, resp, writer, out, item)
            if out is not None and request.transport is not None:
                request.transport.set_write_buffer_limits()  # back to the defaults
        except Exception as exc:
            # The headers are gone: the only honest signal left is to cut the connection,
            # so the client sees a short body and retries instead of trusting it (or
            # waiting for bytes that will never come).
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
                request[CACHE_OUTCOME] = ("error" if isinstance(exc, StorageFailed)
                                          else "upstream_error")
                request[ERROR] = "transfer cut: " + (exc.message if isinstance(exc, RegistryError)
                                                     else f"{type(exc).__name__}: {exc}")
            if request.transport is not None:
                request.transport.close()
            return resp
    await resp.write_eof()
    return resp


#: When the client's socket is full, this much goes through the transport (a copy) while
#: it drains; then ``sendfile`` takes over again.
_SPILL = 64 << 10
#: Bytes per ``sendfile`` call before the loop gets a turn.
_SENDFILE_MAX = 4 << 20


async def _send_span(request: web.Request, resp: web.StreamResponse,
                     writer: AbstractStreamWriter, out: int, span: LocalSpan) -> None:
    """Send a span of a fill file with ``sendfile`` straight from the page cache: no copy
    through Python, so the clients tailing one fill cost little more than one. asyncio's
    ``loop.sendfile`` costs too much per call for spans of a chunk or two, so this calls
    ``os.sendfile`` while the transport has nothing queued; when the socket is full it
    queues a little through the transport, whose write limit of 0 (set by
    :func:`stream_body` with the headers sent) wakes us only once all of it is out."""
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
        await resp.write(data)
        await writer.drain()
        pos += len(data)


async def delete_blob(request: web.Request) -> web.Response:
    """Unlink a blob from a hosted repository (garbage collection reclaims it)."""
    route = route_of(request)
    await hosted_only(request, route).delete_blob(route, Digest.parse(request.match_info["digest"]))
    return web.Response(status=202)
