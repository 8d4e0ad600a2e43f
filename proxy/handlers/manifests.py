"""``/v2/<name>/manifests/<reference>``: GET and HEAD by tag or digest."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import Unsupported
from proxy.handlers.common import PULLTHROUGH, head_response, route_of
from proxy.mediatypes import parse_accept
from proxy.reference import parse_reference


async def get_manifest(request: web.Request) -> web.StreamResponse:
    """Serve a manifest byte for byte, with its stored media type and digest."""
    route = route_of(request)
    reference = parse_reference(request.match_info["reference"])
    head = request.method == "HEAD"
    accepted = parse_accept(request.headers.getall("Accept", ()))
    result = await request.app[PULLTHROUGH].manifest(route, reference, accepted, head=head)
    request["cache"] = result.outcome
    etag = f'"{result.digest}"'
    headers = {
        "Docker-Content-Digest": str(result.digest),
        "ETag": etag,
        "Content-Type": result.media_type,
    }
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    if head or result.data is None:
        return head_response(headers, result.size)
    return web.Response(body=result.data, headers=headers)


async def write_manifest(request: web.Request) -> web.Response:
    """Cached repositories are read-only."""
    route_of(request)  # a bad name is still NAME_INVALID, not UNSUPPORTED
    raise Unsupported(f"{request.method} of manifests is not supported on cached repositories")
