"""What crosses between replicas: ``/_regproxy/fills/<digest>`` (another replica streams a
blob this one is filling) and forwarded upload requests.

Internal to a cluster of replicas (docs/operations.md, "Several replicas"): requests must carry the
cluster secret, and anything else, including "no such fill", is a plain 404 so the
endpoint reveals nothing to strangers. The body follows the fill as bytes arrive, with the
same rule as for every client: the last byte only once the digest checked out.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.errors import BlobUnknown, Unavailable
from proxy.handlers.blobs import send_reader
from proxy.handlers.common import CACHE_OUTCOME, CLUSTER, FILLS
from proxy.pullthrough.cluster import SECRET_HEADER
from proxy.reference import Digest
from proxy.results import CacheOutcome


def is_utf8(value: str) -> bool:
    """Whether a header value came as UTF-8: aiohttp keeps undecodable bytes as lone
    surrogates, which ``encode()`` (a comparison, a forwarded request) refuses."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def presented_secret(request: web.Request) -> str | None:
    """The cluster secret a request carries; ``None`` when absent or not UTF-8 (no
    configured secret is)."""
    value = request.headers.get(SECRET_HEADER)
    return value if value is not None and is_utf8(value) else None


async def serve_fill(request: web.Request) -> web.StreamResponse:
    if not request.app[CLUSTER].authorized(presented_secret(request)):
        raise BlobUnknown("no such fill")
    digest = Digest.parse(request.match_info["digest"])
    result = await request.app[FILLS].local(digest)
    if result is None:
        raise BlobUnknown(f"no fill of {digest} here")
    request[CACHE_OUTCOME] = CacheOutcome.PEER
    headers = {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream"}
    return await send_reader(request, headers, result.size, result.reader)


#: Marks a request one replica forwarded to another, which must then answer it itself.
FORWARDED = "X-Regproxy-Forwarded"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "host", "content-length", "date", "server"}


async def forward_upload(request: web.Request, uid: str) -> web.StreamResponse | None:
    """An upload started on another replica lives on that replica's disk: relay the request
    there (body streamed) and its answer back, so pushes need no sticky load balancing.
    ``None`` when the upload is not another replica's."""
    cluster = request.app[CLUSTER]
    if request.headers.get(FORWARDED):
        return None
    owner = await cluster.upload_owner(uid)
    if owner is None or cluster.session is None:
        return None
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in _HOP_BY_HOP and is_utf8(v)}
    headers[FORWARDED] = "1"
    body = request.content if request.can_read_body else None
    try:
        async with cluster.session.request(
                request.method, f"{owner}{request.path_qs}", headers=headers, data=body,
                allow_redirects=False) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unavailable(f"the replica holding upload {uid} is unreachable "
                          f"({type(exc).__name__}); restart the upload") from None
    return web.Response(status=resp.status, headers=out, body=payload)
