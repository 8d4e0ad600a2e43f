"""``/v2/<name>/blobs/<digest>``: GET and HEAD, cached (sendfile) or tailing a fill."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import ClientConnectionResetError, web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import RegistryError
from proxy.handlers.common import CACHE_OUTCOME, head_response, hosted_only, reader_of, route_of
from proxy.handlers.ranges import parse_range
from proxy.pullthrough.service import BlobResult
from proxy.reference import Digest

log = logging.getLogger("regproxy.http")


class CorkedFileResponse(web.FileResponse):
    """A file response sent with ``TCP_CORK`` set (nginx's ``tcp_nopush``): ``sendfile``
    then leaves only full segments, which measured +25 % for one client on loopback
    (1.7 -> 2.1 GiB/s, nginx alike). Uncorked at the end so the tail goes out at once."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return await super().prepare(request)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return await super().prepare(request)
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


async def get_blob(request: web.Request) -> web.StreamResponse:
    """Serve a blob; Range requests get 206 whether the blob is stored or still arriving."""
    route = route_of(request)
    digest = Digest.parse(request.match_info["digest"])
    head = request.method == "HEAD"
    service = reader_of(request, route)
    result = await service.blob(route, digest, head=head)
    request[CACHE_OUTCOME] = result.outcome
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
    }
    store = service.store
    if result.stored:
        assert result.size is not None
        rng = parse_range(request.headers.get("Range"), result.size)  # 416 as an OCI error
        path = store.local_path(digest)
        if path is not None:
            return CorkedFileResponse(path, headers=headers, chunk_size=1 << 20)
        if head:
            return head_response(headers, result.size)
        url = await store.redirect_url(digest)
        if url is not None:
            return web.Response(status=307, headers={**headers, "Location": url})
        return await stream_body(request, headers, result.size, rng,
                                 lambda s, e: store.open_blob(digest, s, e))
    if result.reader is None:  # HEAD answered from upstream
        return head_response(headers, result.size)
    return await stream_reader(request, headers, result)


async def stream_reader(request: web.Request, headers: dict[str, str], result: BlobResult
                        ) -> web.StreamResponse:
    """Send a blob still being filled (``result.reader``), honouring ``Range``; the reader
    is closed whatever happens."""
    assert result.reader is not None
    try:
        rng = None if result.size is None else parse_range(request.headers.get("Range"),
                                                           result.size)
        return await stream_body(request, headers, result.size, rng, result.reader.stream)
    finally:
        result.reader.close()


async def stream_body(request: web.Request, headers: dict[str, str], size: int | None,
                  rng: tuple[int, int] | None,
                  source: Callable[[int, int | None], AsyncIterator[bytes]]) -> web.StreamResponse:
    """Send ``source(start, end)`` as the body (206 for a range). An error once the headers
    are out cuts the connection: the client sees a short body and retries."""
    start, end, status = 0, size, 200
    if rng is not None and size is not None:
        start, end = rng
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    if end is not None:
        resp.content_length = end - start
    await resp.prepare(request)
    if request.method != "HEAD":
        try:
            async for chunk in source(start, end):
                await resp.write(chunk)
        except Exception as exc:
            # The headers are gone: the only honest signal left is to cut the connection,
            # so the client sees a short body and retries instead of trusting it (or
            # waiting for bytes that will never come).
            if isinstance(exc, ConnectionResetError | ClientConnectionResetError):
                log.info("client %s left during %s", request.remote, request.path)
            elif isinstance(exc, RegistryError):
                log.warning("aborting %s for %s: %s", request.path, request.remote, exc.message)
            else:
                log.exception("aborting %s for %s", request.path, request.remote)
            request[CACHE_OUTCOME] = "upstream_error"
            if request.transport is not None:
                request.transport.close()
            return resp
    await resp.write_eof()
    return resp


async def delete_blob(request: web.Request) -> web.Response:
    """Unlink a blob from a hosted repository (garbage collection reclaims it)."""
    route = route_of(request)
    await hosted_only(request, route).delete_blob(route, Digest.parse(request.match_info["digest"]))
    return web.Response(status=202)
