"""Operational endpoints: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz``."""

from __future__ import annotations

from aiohttp import web

from proxy import metrics
from proxy.handlers.common import STAGING_PROBLEM, STORE

#: (``nosniff`` and the other common headers come from the app's response hook)
_SECURITY_HEADERS = {"Cache-Control": "no-store"}


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type, **_SECURITY_HEADERS})


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"status": "ok"}, headers=_SECURITY_HEADERS)


async def readyz(request: web.Request) -> web.Response:
    """Ready to serve: the configuration is loaded, the local store is writable and the
    object store (S3 backend) answers."""
    problem = request.app[STAGING_PROBLEM]()
    if problem is not None:
        return web.json_response({"status": "unavailable", "storage": problem},
                                 status=503, headers=_SECURITY_HEADERS)
    problem = await request.app[STORE].check()
    if problem is not None:
        return web.json_response({"status": "unavailable", "storage": problem},
                                 status=503, headers=_SECURITY_HEADERS)
    return web.json_response({"status": "ready"}, headers=_SECURITY_HEADERS)
