"""``/_regproxy/fills/<digest>``: another replica streams a blob this one is filling.

Internal to a cluster of replicas (README, "Several replicas"): requests must carry the
cluster secret, and anything else, including "no such fill", is a plain 404 so the
endpoint reveals nothing to strangers. The body follows the fill as bytes arrive, with the
same rule as for every client: the last byte only once the digest checked out.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BlobUnknown
from proxy.handlers.blobs import stream_body
from proxy.handlers.common import CACHE_OUTCOME, PULLTHROUGH
from proxy.handlers.ranges import parse_range
from proxy.pullthrough.cluster import SECRET_HEADER
from proxy.reference import Digest


async def serve_fill(request: web.Request) -> web.StreamResponse:
    pullthrough = request.app[PULLTHROUGH]
    cluster = pullthrough.cluster
    if cluster is None or not cluster.authorized(request.headers.get(SECRET_HEADER)):
        raise BlobUnknown("no such fill")
    digest = Digest.parse(request.match_info["digest"])
    result = await pullthrough.local_fill(digest)
    if result is None or result.reader is None:
        raise BlobUnknown(f"no fill of {digest} here")
    request[CACHE_OUTCOME] = "peer"
    reader = result.reader
    try:
        rng = None if result.size is None else parse_range(request.headers.get("Range"),
                                                           result.size)
        headers = {"Docker-Content-Digest": str(digest), "Content-Type": "application/octet-stream"}
        return await stream_body(request, headers, result.size, rng, reader.stream)
    finally:
        reader.close()
