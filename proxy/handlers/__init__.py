"""The HTTP layer: routes of the Docker Registry HTTP API V2 / OCI distribution spec."""

from __future__ import annotations

from aiohttp import web

from proxy.handlers import base, blobs, manifests, tags
from proxy.handlers.common import oci_errors

# Repository names contain slashes, so ``name`` is a regex that may span segments; the
# fixed suffixes after it keep the patterns unambiguous.
_NAME = "{name:[^{}]+?}"


def setup_routes(app: web.Application) -> None:
    """Register every V2 endpoint; aiohttp answers HEAD through the GET routes' handlers."""
    r = app.router
    r.add_get("/v2/", base.version_check)
    r.add_get("/v2", base.version_check)
    r.add_get("/v2/_catalog", tags.catalog)
    r.add_get(f"/v2/{_NAME}/tags/list", tags.list_tags)
    r.add_get(f"/v2/{_NAME}/manifests/{{reference}}", manifests.get_manifest)
    for method in ("PUT", "DELETE"):
        r.add_route(method, f"/v2/{_NAME}/manifests/{{reference}}", manifests.write_manifest)
    r.add_route("POST", f"/v2/{_NAME}/blobs/uploads/", blobs.write_blob)
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        r.add_route(method, f"/v2/{_NAME}/blobs/uploads/{{uuid}}", blobs.write_blob)
    r.add_get(f"/v2/{_NAME}/blobs/{{digest}}", blobs.get_blob)
    r.add_route("DELETE", f"/v2/{_NAME}/blobs/{{digest}}", blobs.write_blob)


__all__ = ["oci_errors", "setup_routes"]
