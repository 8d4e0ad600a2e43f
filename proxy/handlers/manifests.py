"""``/v2/<name>/manifests/<reference>``: GET and HEAD by tag or digest."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ManifestUnknown, PayloadTooLarge, TagInvalid
from proxy.handlers.common import CACHE_OUTCOME, head_response, hosted_only, route_of, service_for
from proxy.mediatypes import parse_accept
from proxy.reference import Digest, parse_reference


def _existing_reference(value: str) -> str | Digest:
    """A reference to look up: a tag outside the grammar cannot exist, so it is a 404
    (what the OCI conformance suite expects), while a malformed digest stays a 400."""
    try:
        return parse_reference(value)
    except TagInvalid:
        raise ManifestUnknown(f"manifest {value[:200]!r} unknown") from None


async def get_manifest(request: web.Request) -> web.StreamResponse:
    """Serve a manifest byte for byte, with its stored media type and digest."""
    route = route_of(request)
    reference = _existing_reference(request.match_info["reference"])
    head = request.method == "HEAD"
    accepted = parse_accept(request.headers.getall("Accept", ()))
    result = await service_for(request, route).manifest(route, reference, accepted, head=head)
    request[CACHE_OUTCOME] = result.outcome
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


async def put_manifest(request: web.Request) -> web.Response:
    """Store a pushed manifest (hosted repositories); 201 with its digest."""
    route = route_of(request)
    service = hosted_only(request, route)
    reference = parse_reference(request.match_info["reference"])
    limit = service.max_manifest_size
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"manifest exceeds {limit} bytes")
    data = await request.content.read(limit + 1)
    while len(data) <= limit and (more := await request.content.read(limit + 1 - len(data))):
        data += more
    digest, subject = await service.put_manifest(
        route, reference, data, request.headers.get("Content-Type", ""))
    headers = {"Location": f"/v2/{route.name}/manifests/{digest}",
               "Docker-Content-Digest": str(digest)}
    if subject is not None:
        headers["OCI-Subject"] = str(subject)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    """Delete a manifest by digest, or only a tag (OCI 1.1)."""
    route = route_of(request)
    service = hosted_only(request, route)
    await service.delete_manifest(route, _existing_reference(request.match_info["reference"]))
    return web.Response(status=202)
