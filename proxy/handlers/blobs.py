"""``/v2/<name>/blobs/<digest>``: GET and HEAD, of a stored blob or one still arriving.

The handler only says what the body is (proxy/handlers/blobresponse.py sends it)."""

from __future__ import annotations

import os

from aiohttp import web

from proxy.errors import Unavailable
from proxy.handlers.blobresponse import BlobResponse, ByteStream, LocalSpans, Redirect
from proxy.handlers.common import CACHE_OUTCOME, STORE, hosted_only, route_of, service_for
from proxy.reference import Digest
from proxy.results import BlobReader, CacheOutcome, FillingBlob, LocalSpan, StoredBlob, UpstreamHead


async def get_blob(request: web.Request) -> web.StreamResponse:
    """Serve a blob; Range requests get 206 whether the blob is stored or still arriving."""
    route = route_of(request)
    digest = Digest.parse(request.match_info["digest"])
    head = request.method == "HEAD"
    service = service_for(request, route)
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',  # content-addressed: the digest is the strongest validator
    }
    store = request.app[STORE]
    for _ in range(3):  # a blob evicted between the lookup and the open is a miss: look again
        result = await service.blob(route, digest, head=head)
        request[CACHE_OUTCOME] = result.outcome
        # whether the bytes come off the store or from the upstream (`regproxy warm` counts it)
        headers["X-Cache"] = "hit" if isinstance(result, StoredBlob) else "miss"
        match result:
            case FillingBlob():
                return await send_reader(request, headers, result.size, result.reader)
            case UpstreamHead():
                return await BlobResponse(headers, result.size, None).send(request)
        if head:
            return await BlobResponse(headers, result.size, None).send(request)
        path = store.local_path(digest)
        if path is None:
            url = await store.redirect_url(digest)
            body = (Redirect(url) if url is not None
                    else ByteStream(lambda s, e: store.open_blob(digest, s, e)))
            return await BlobResponse(headers, result.size, body).send(request)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            return await BlobResponse(headers, result.size, LocalSpan(fd, 0, result.size)
                                      ).send(request)
        finally:
            os.close(fd)
    request[CACHE_OUTCOME] = CacheOutcome.ERROR
    raise Unavailable(f"blob {digest} was evicted while being served; retry")


async def send_reader(request: web.Request, headers: dict[str, str], size: int | None,
                      reader: BlobReader) -> web.StreamResponse:
    """Send a blob still arriving, from its reader's local file where it has one; the
    reader is closed whatever happens."""
    try:
        spans = reader.local_spans
        body = ByteStream(reader.stream) if spans is None else LocalSpans(spans)
        return await BlobResponse(headers, size, body).send(request)
    finally:
        reader.close()


async def delete_blob(request: web.Request) -> web.Response:
    """Unlink a blob from a hosted repository (garbage collection reclaims it)."""
    route = route_of(request)
    await hosted_only(request, route).delete_blob(route, Digest.parse(request.match_info["digest"]))
    return web.Response(status=202)
