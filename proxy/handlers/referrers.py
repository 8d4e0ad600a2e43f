"""``/v2/<name>/referrers/<digest>``: the OCI 1.1 referrers API."""

from __future__ import annotations

import json

from aiohttp import web

from proxy.handlers.common import HOSTED, route_of
from proxy.mediatypes import OCI_INDEX
from proxy.reference import Digest


async def list_referrers(request: web.Request) -> web.Response:
    """An image index of the manifests whose subject is the digest (empty, never a 404)."""
    route = route_of(request)
    subject = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    headers = {"Content-Type": OCI_INDEX}
    if route.hosted:
        body = await request.app[HOSTED].referrers(route, subject, artifact_type)
    else:  # cached repositories keep no referrers of their own
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=body, headers=headers)
