"""The HTTP layer: routes of the Docker Registry HTTP API V2 / OCI distribution spec."""

from __future__ import annotations

import re

from aiohttp import web

from proxy.handlers import base, blobs, cluster, console, manifests, ops, referrers, status, tags, uploads
from proxy.handlers.common import Handler, endpoint_unknown, method_unsupported, oci, oci_errors
from proxy.timeseries import UNCOUNTED_HANDLERS

# Repository names contain slashes, so ``name`` is a regex that may span segments; the
# fixed suffixes after it keep the patterns unambiguous.
_NAME = "{name:[^{}]+?}"
#: An upstream's name as a path prefix: a host name, optionally with a port.
_PREFIX = r"[a-z0-9][a-z0-9.-]*(?::[0-9]+)?"


#: The operational pages: they name repositories and upstreams, so with ``[auth]`` only the
#: ``ops`` right sees them, and with ``server.debug_listen`` only that listener serves them.
OPS_PAGES: dict[str, Handler] = {
    "/metrics": ops.metrics_endpoint,
    "/": status.status_page,
    "/status": status.status_page,
    "/status.json": status.status_json,
    **console.CONSOLE_PAGES,  # the web console and its API
}
#: What every listener serves, the debug listener included: liveness and readiness probes.
PROBES: dict[str, Handler] = {"/healthz": ops.healthz, "/readyz": ops.readyz}
#: Operational actions (POST): the console's purge. Only where the pages are, behind the
#: same rule; never on the debug listener (it has no authentication).
OPS_ACTIONS: dict[str, Handler] = dict(console.CONSOLE_ACTIONS)
#: The operational pages as aiohttp names their routes (``{name:.+}`` -> ``{name}``), for
#: the auth layer to recognise them.
OPS_CANONICAL = frozenset(re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path) for path in (*OPS_PAGES, *OPS_ACTIONS))
# the console's time series leave out the operational pages and probes (no traffic)
UNCOUNTED_HANDLERS.update(h.__name__ for h in (*OPS_PAGES.values(), *PROBES.values()))


def setup_routes(app: web.Application, *, ops_pages: bool = True) -> None:
    """Register every endpoint, each wrapped by :func:`oci`; aiohttp answers HEAD through
    the GET handlers. Unknown methods and paths get OCI errors from catch-all routes.

    ``ops_pages=False`` leaves out :data:`OPS_PAGES` (they are on the debug listener)."""
    # aiohttp tries the /v2/<name>/... patterns in this order: the reads every pull makes
    # come first (the patterns are disjoint, so the order changes nothing else).
    routes: list[tuple[str, str, Handler]] = [
        ("GET", f"/v2/{_NAME}/manifests/{{reference}}", manifests.get_manifest),
        ("PUT", f"/v2/{_NAME}/manifests/{{reference}}", manifests.put_manifest),
        ("DELETE", f"/v2/{_NAME}/manifests/{{reference}}", manifests.delete_manifest),
        ("GET", f"/v2/{_NAME}/blobs/{{digest}}", blobs.get_blob),
        ("DELETE", f"/v2/{_NAME}/blobs/{{digest}}", blobs.delete_blob),
        ("GET", "/v2/", base.version_check),
        ("GET", "/v2", base.version_check),
        ("GET", "/v2/_catalog", tags.catalog),
        ("GET", f"/v2/{_NAME}/tags/list", tags.list_tags),
        ("POST", f"/v2/{_NAME}/blobs/uploads/", uploads.start_upload),
        ("GET", f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.upload_status),
        ("PATCH", f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.patch_upload),
        ("PUT", f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.finish_upload),
        ("DELETE", f"/v2/{_NAME}/blobs/uploads/{{uuid}}", uploads.cancel_upload),
        ("GET", f"/v2/{_NAME}/referrers/{{digest}}", referrers.list_referrers),
        *(("GET", path, handler) for path, handler in PROBES.items()),
        *(("POST", path, handler) for path, handler in OPS_ACTIONS.items() if ops_pages),
        *(("GET", path, handler) for path, handler in OPS_PAGES.items() if ops_pages),
        ("GET", "/_regproxy/fills/{digest}", cluster.serve_fill),
    ]
    # The same API under an upstream prefix, ``/<upstream>/v2/...``: a Docker Engine 25+
    # ``registry-mirrors`` entry may carry a path (``http://cache:5000/docker.io``).
    routes += [(method, f"/{{prefix:{_PREFIX}}}{path}", handler)
               for method, path, handler in list(routes) if path.startswith("/v2")]
    paths: list[str] = []
    for method, path, handler in routes:
        if method == "GET":
            app.router.add_get(path, oci(handler))  # with HEAD
        else:
            app.router.add_route(method, path, oci(handler))
        if path not in paths:
            paths.append(path)
    for path in paths:
        app.router.add_route("*", path, oci(method_unsupported))


def add_catch_all(app: web.Application) -> None:
    """The last route: anything else is an OCI 404 (call after every other route)."""
    app.router.add_route("*", "/{tail:.*}", oci(endpoint_unknown))


__all__ = ["OPS_ACTIONS", "OPS_CANONICAL", "OPS_PAGES", "PROBES", "add_catch_all", "oci", "oci_errors",
           "setup_routes"]
