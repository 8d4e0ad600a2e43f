"""``/v2/<name>/referrers/<digest>``: the OCI 1.1 referrers API."""

from __future__ import annotations

from aiohttp import web

from proxy.handlers.common import HOSTED, PULLTHROUGH, route_of
from proxy.mediatypes import OCI_INDEX
from proxy.policy.referrers import filter_referrers, referrers_index
from proxy.reference import Digest


async def list_referrers(request: web.Request) -> web.Response:
    """An image index of the manifests whose subject is the digest (empty, never a 404):
    pushed here (hosted) or listed by the upstream and pulled through (cached). The
    ``artifactType`` filter is always applied here, so the header always says so."""
    route = route_of(request)
    subject = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    headers = {"Content-Type": OCI_INDEX}
    if route.hosted:
        entries = await request.app[HOSTED].referrers(route, subject)
    else:
        entries = await request.app[PULLTHROUGH].referrers(route, subject)
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=referrers_index(filter_referrers(entries, artifact_type)),
                        headers=headers)
