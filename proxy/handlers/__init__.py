"""The HTTP layer: routes of the Docker Registry HTTP API V2 / OCI distribution spec."""

from __future__ import annotations

from aiohttp import web

from proxy.handlers import base, blobs, manifests, ops, referrers, status, tags, uploads
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
    r.add_put(f"/v2/{_NAME}/manifests/{{reference}}", manifests.put_manifest)
    r.add_delete(f"/v2/{_NAME}/manifests/{{reference}}", manifests.delete_manifest)
    r.add_post(f"/v2/{_NAME}/blobs/uploads/", uploads.start_upload)
    r.add_get(f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.upload_status)
    r.add_patch(f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.patch_upload)
    r.add_put(f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.finish_upload)
    r.add_delete(f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.cancel_upload)
    r.add_get(f"/v2/{_NAME}/blobs/{{digest}}", blobs.get_blob)
    r.add_delete(f"/v2/{_NAME}/blobs/{{digest}}", blobs.delete_blob)
    r.add_get(f"/v2/{_NAME}/referrers/{{digest}}", referrers.list_referrers)
    r.add_get("/metrics", ops.metrics_endpoint)
    r.add_get("/healthz", ops.healthz)
    r.add_get("/readyz", ops.readyz)
    r.add_get("/", status.status_page)
    r.add_get("/status", status.status_page)
    r.add_get("/status.json", status.status_json)


__all__ = ["oci_errors", "setup_routes"]
