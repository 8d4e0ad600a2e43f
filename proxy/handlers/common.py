"""What every handler shares: typed app keys, request parsing, OCI error responses."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.errors import RegistryError, Unsupported
from proxy.hosted import Hosted
from proxy.pullthrough import PullThrough
from proxy.pullthrough.coordination import ClusterEndpoint
from proxy.pullthrough.evictor import Evictor
from proxy.pullthrough.fills import Fills
from proxy.results import CacheOutcome
from proxy.routing import Route, Router
from proxy.storage import Store
from proxy.storage.failures import storage_failure
from proxy.workerstatus import WorkerStatus

log = logging.getLogger("regproxy.http")

ROUTER = web.AppKey("router", Router)
PULLTHROUGH = web.AppKey("pullthrough", PullThrough)
HOSTED = web.AppKey("hosted", Hosted)
#: The store both services read (the catalog, readiness, stored blobs' bytes).
STORE = web.AppKey("store", Store)
#: What is wrong with the local staging area (``tmp/``, ``uploads/``), ``None`` if nothing.
STAGING_PROBLEM: web.AppKey[Callable[[], str | None]] = web.AppKey("staging_problem")
#: The fills of this process, for other replicas to stream from.
FILLS = web.AppKey("fills", Fills)
#: Other replicas (the internal fill endpoint, forwarded uploads); none without a cluster.
CLUSTER: web.AppKey[ClusterEndpoint] = web.AppKey("cluster")
#: Per-request notes for the access log and metrics: the cache outcome and the local name.
CACHE_OUTCOME = web.RequestKey("regproxy.cache", CacheOutcome)
REPO = web.RequestKey("regproxy.repo", str)
#: Set by the auth layer: which local names ``_catalog`` may list for this client.
CATALOG_FILTER: web.RequestKey[Callable[[str], bool]] = web.RequestKey("regproxy.catalog_filter")
EVICTOR = web.AppKey("evictor", Evictor)
WORKER_STATUS = web.AppKey("worker_status", WorkerStatus)
#: Set by the auth layer for a signed-in client: whom its uploads count against.
USER = web.RequestKey("regproxy.user", str)
#: Why the request failed (its OCI error, or why its transfer was cut), for the access log.
ERROR = web.RequestKey("regproxy.error", str)

def upstream_ns(request: web.Request) -> str | None:
    """The upstream a request names: containerd's ``?ns=`` or a mirror path prefix."""
    ns = request.query.get("ns") if request.query_string else None  # (no parse: hot path)
    return ns or request.match_info.get("prefix")


def route_of(request: web.Request) -> Route:
    """The route of the repository named in the path; containerd's ``?ns=`` or a mirror
    path prefix (``/<upstream>/v2/...``) chooses the upstream."""
    route = request.app[ROUTER].route(request.match_info["name"], upstream_ns(request))
    request[REPO] = route.name
    return route


def service_for(request: web.Request, route: Route) -> Hosted | PullThrough:
    """The service that answers reads of ``route``: the store alone, or the pull-through.
    Reads of hosted repositories are no cache reads, whatever their answer."""
    if route.hosted:
        request[CACHE_OUTCOME] = CacheOutcome.HOSTED
        return request.app[HOSTED]
    return request.app[PULLTHROUGH]


def hosted_only(request: web.Request, route: Route) -> Hosted:
    """The hosted service, or UNSUPPORTED for writes to a cached repository."""
    if not route.hosted:
        raise Unsupported(f"{request.method} is not supported on cached repository {route.name}; "
                          "push to a hosted repository instead")
    return request.app[HOSTED]


def head_response(headers: dict[str, str], size: int | None) -> web.StreamResponse:
    """A body-less answer that still announces the object's real ``Content-Length``."""
    resp = web.StreamResponse(headers=headers)
    if size is not None:
        resp.content_length = size
    return resp


def error_response(exc: RegistryError) -> web.Response:
    headers = {"Content-Type": "application/json", **exc.headers}
    return web.Response(status=exc.status, body=exc.body(), headers=headers)


class EndpointUnknown(RegistryError):
    code, status, default_message = "NOT_FOUND", 404, "unknown API endpoint"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def oci(handler: Handler) -> Handler:
    """Wrap a handler so that every failure becomes an OCI error body (no middleware: a
    wrapper costs less per request)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return _answer_error(request, exc)

    return wrapped


async def endpoint_unknown(request: web.Request) -> web.StreamResponse:
    """Catch-all for paths outside the API."""
    raise EndpointUnknown(f"no API endpoint at {request.path[:200]}")


async def method_unsupported(request: web.Request) -> web.StreamResponse:
    """Catch-all for methods an endpoint does not have."""
    raise Unsupported(f"{request.method} is not supported here")


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an OCI error body; nothing escapes as a traceback (the
    middleware form, for layers such as auth that raise before a handler runs)."""
    try:
        return await handler(request)
    except Exception as exc:
        return _answer_error(request, exc)


def error_outcome(status: int) -> CacheOutcome:
    """The cache outcome of a read that failed with ``status`` before it had one: a name
    that exists nowhere is ``not_found``, a failure to serve it ``error``; a refused
    request (bad name, no credentials, no right) is no cache read at all (``-``)."""
    if status == 404:
        return CacheOutcome.NOT_FOUND
    return CacheOutcome.ERROR if status >= 500 else CacheOutcome.NONE


def _answer_error(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The OCI error response for ``exc``; re-raises what aiohttp must see itself (other
    HTTP exceptions, a client that went away). Call it from the ``except`` clause."""
    if isinstance(exc, RegistryError):
        if CACHE_OUTCOME not in request:
            request[CACHE_OUTCOME] = error_outcome(exc.status)
        request[ERROR] = f"{exc.code}: {exc.message}"
        return error_response(exc)
    failed = storage_failure(exc)  # a full disk: one line that says so, not a traceback
    if failed is not None:
        log.error("%s %s: %s", request.method, request.path[:200], failed.message)
        request[ERROR] = f"{failed.code}: {failed.message}"
        if request.get(CACHE_OUTCOME) != CacheOutcome.HOSTED:  # (no cache read)
            request[CACHE_OUTCOME] = CacheOutcome.ERROR
        return error_response(failed)
    if isinstance(exc, web.HTTPNotFound):
        return error_response(EndpointUnknown(f"no API endpoint at {request.path[:200]}"))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return error_response(Unsupported(f"{request.method} is not supported here"))
    if isinstance(exc, web.HTTPException | ConnectionError):
        raise exc
    log.error("unhandled error for %s %s", request.method, request.path[:200], exc_info=exc)
    request[ERROR] = f"internal error: {type(exc).__name__}: {exc}"
    return error_response(RegistryError("internal error; see the proxy's log"))
