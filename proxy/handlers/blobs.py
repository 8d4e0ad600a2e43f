"""``/v2/<name>/blobs/<digest>``: GET and HEAD, cached (sendfile) or tailing a fill."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.errors import RegistryError
from proxy.handlers.common import CACHE_OUTCOME, head_response, hosted_only, reader_of, route_of
from proxy.handlers.ranges import parse_range
from proxy.reference import Digest

log = logging.getLogger("regproxy.http")


async def get_blob(request: web.Request) -> web.StreamResponse:
    """Serve a blob; Range requests get 206 whether the blob is stored or still arriving."""
    route = route_of(request)
    digest = Digest.parse(request.match_info["digest"])
    head = request.method == "HEAD"
    result = await reader_of(request, route).blob(route, digest, head=head)
    request[CACHE_OUTCOME] = result.outcome
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
    }
    if result.path is not None:
        assert result.size is not None
        parse_range(request.headers.get("Range"), result.size)  # 416 as an OCI error
        return web.FileResponse(result.path, headers=headers, chunk_size=1 << 20)
    if result.reader is None:  # HEAD answered from upstream
        return head_response(headers, result.size)

    reader = result.reader
    try:
        start, end, status = 0, result.size, 200
        if result.size is not None:
            rng = parse_range(request.headers.get("Range"), result.size)
            if rng is not None:
                start, end = rng
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{result.size}"
        resp = web.StreamResponse(status=status, headers=headers)
        if end is not None:
            resp.content_length = end - start
        await resp.prepare(request)
        try:
            async for chunk in reader.stream(start, end):
                await resp.write(chunk)
        except Exception as exc:
            # The headers are gone: the only honest signal left is to cut the connection,
            # so the client sees a short body and retries instead of trusting it (or
            # waiting for bytes that will never come).
            if isinstance(exc, RegistryError):
                log.warning("aborting %s for %s: %s", request.path, request.remote, exc.message)
            else:
                log.exception("aborting %s for %s", request.path, request.remote)
            request[CACHE_OUTCOME] = "upstream_error"
            if request.transport is not None:
                request.transport.close()
            return resp
    finally:
        reader.close()
    await resp.write_eof()
    return resp


async def delete_blob(request: web.Request) -> web.Response:
    """Unlink a blob from a hosted repository (garbage collection reclaims it)."""
    route = route_of(request)
    hosted_only(request, route).delete_blob(route, Digest.parse(request.match_info["digest"]))
    return web.Response(status=202)
