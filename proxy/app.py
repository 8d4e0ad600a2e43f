"""Wiring: build the aiohttp application from a :class:`~proxy.config.Config`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy import debuglisten, layout, metrics, tls
from proxy.accesslog import set_request_id
from proxy.auth.middleware import install as install_auth
from proxy.config import Config
from proxy.handlers import add_catch_all, oci_errors, setup_routes
from proxy.handlers.common import (
    CLUSTER,
    EVICTOR,
    FILLS,
    HOSTED,
    PULLTHROUGH,
    ROUTER,
    STAGING_PROBLEM,
    STORE,
    WORKER_STATUS,
)
from proxy.handlers.console import CONSOLE_CONFIG, CONSOLE_STORAGE, CONSOLE_WARMS, StorageIndex, Warms
from proxy.hosted import Hosted, UploadLimits
from proxy.pullthrough import PullThrough
from proxy.pullthrough.cluster import Cluster
from proxy.pullthrough.coordination import HostOnly
from proxy.pullthrough.evictor import Evictor
from proxy.pullthrough.fills import Fills
from proxy.routing import Namespaces, Router
from proxy.sharedcache import make_cache
from proxy.storage import UploadStore
from proxy.storage.backend import open_store
from proxy.storage.space import FreeSpace
from proxy.upstream import UpstreamClient
from proxy.workerstatus import WorkerStatus

log = logging.getLogger("regproxy")

CONFIG = web.AppKey("config", Config)
#: Request bodies on a cache are tiny; uploads (hosted repositories) stream past this cap.
CLIENT_MAX_SIZE = 4 << 20
#: Limits of the HTTP server (aiohttp handler arguments): request line and header sizes, the
#: number of headers, and how long an idle keep-alive connection is kept.
SERVER_LIMITS = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 64,
                 "keepalive_timeout": 60.0}


#: Sent on every response: the API version clients check, headers that keep browsers
#: from interpreting registry content, and a ``Server`` that replaces aiohttp's (which
#: names its version). One prebuilt multidict (its keys are case-folded once), added in
#: one response hook: hooks and middlewares cost a measurable share of a manifest hit.
COMMON_HEADERS = CIMultiDictProxy(CIMultiDict((
    ("Docker-Distribution-API-Version", "registry/2.0"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Server", "regproxy"),
)))
#: Pages that set their own policy (the status page) keep it. ``sandbox``: should some
#: stored content still reach a browser as a document, it runs in an opaque origin,
#: without scripts, forms or access to this origin's cookies.
CSP = istr("Content-Security-Policy")
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


def _add_common_headers(request: web.Request, headers: CIMultiDict[str]) -> None:
    headers.update(COMMON_HEADERS)
    if CSP not in headers:
        headers[CSP] = DEFAULT_CSP
    if request.secure:
        headers["Strict-Transport-Security"] = "max-age=31536000"


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    _add_common_headers(request, response.headers)


async def _common_headers_and_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """:func:`_common_headers` and the ``X-Request-Id`` (access log on): one hook, not two."""
    _add_common_headers(request, response.headers)
    set_request_id(request, response.headers)


CLEAN_TMP = web.AppKey("clean_tmp", bool)


def create_app(config: Config, *, clean_tmp: bool = True) -> web.Application:
    """An application serving the V2 API; its services start with the app and stop with it.

    ``clean_tmp=False`` for worker processes: the parent cleaned the store's ``tmp/``.
    """
    # Handlers turn their own errors into OCI bodies; the error middleware is only needed
    # (outermost) when the auth middleware, which raises them too, is installed.
    middlewares = [oci_errors] if config.auth is not None else []
    app = web.Application(middlewares=middlewares, client_max_size=CLIENT_MAX_SIZE)
    app[CONFIG] = config
    app[CONSOLE_CONFIG] = config  # (the console's configuration page)
    app[CONSOLE_WARMS] = Warms()  # (its warm action's jobs)
    app[CONSOLE_STORAGE] = StorageIndex()  # (its storage page's walk of the store)
    app.on_shutdown.append(lambda a: a[CONSOLE_WARMS].close())
    app[CLEAN_TMP] = clean_tmp
    # request ids only with the access log on: they are there to correlate its lines
    app.on_response_prepare.append(_common_headers_and_request_id if config.access_log
                                   else _common_headers)
    app.cleanup_ctx.append(_services)
    # with a debug listener, the status pages and metrics are served there only
    debuglisten.install(app, config, on_prepare=_common_headers, limits=SERVER_LIMITS)
    setup_routes(app, ops_pages=config.debug_listen is None)
    install_auth(app, config.auth, tuple(config.upstreams))  # auth middleware, /auth/token
    tls.install(app, config.tls)  # app[tls.SSL_CONTEXT] and certificate reload
    add_catch_all(app)
    return app


async def _purge_uploads(hosted: Hosted, max_age: float) -> None:
    """Remove abandoned uploads at start and then periodically."""
    interval = min(max(max_age / 4, 60.0), 3600.0)
    while True:
        await asyncio.get_running_loop().run_in_executor(None, hosted.uploads.purge, max_age)
        await asyncio.sleep(interval)


async def _services(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    stack = contextlib.AsyncExitStack()
    store, staging = await stack.enter_async_context(open_store(config, clean=app[CLEAN_TMP]))
    names = Namespaces(config.upstreams, config.default_upstream, config.hosted)
    upgrading = await layout.ensure(store, staging, names)
    session = aiohttp.ClientSession(
        auto_decompress=False,  # blobs are verified and stored exactly as sent
        read_bufsize=4 << 20,
        connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
        headers={"User-Agent": "regproxy/0.1"},
    )
    tokens = make_cache(config.cache_backend, config.cache_url, "token")
    tags = make_cache(config.cache_backend, config.cache_url, "tag")
    # a breaker opened by another replica matters only when replicas share a backend
    breakers = (make_cache(config.cache_backend, config.cache_url, "breaker")
                if config.cache_backend != "memory" else None)
    # who else may do the same work: this host's workers only, or other replicas too
    cluster: Cluster | HostOnly = HostOnly(staging.try_lock)
    if config.cluster is not None:
        assert config.cache_url is not None  # config: [cluster] requires the redis backend
        cluster = Cluster(config.cluster, config.cache_url, session)
        stack.push_async_callback(cluster.close)
    upstreams = {  # one breaker per upstream for all workers: a file in the store's locks/
        name: UpstreamClient(cfg, session, tokens, breakers,
                             breaker_file=staging.lock_path(f"breaker:{name}"))
        for name, cfg in config.upstreams.items()
    }
    space = FreeSpace(config.storage_root, config.min_free, config.min_free_percent)
    fills = Fills(store, staging, cluster, before_fill=space.check_fill)
    pullthrough = PullThrough(
        store,
        fills,
        cluster,
        tags,
        staging.try_lock,
        tag_ttl=config.tag_ttl,
        tag_grace=config.tag_stale_while_revalidate,
        max_manifest_size=config.max_manifest_size,
        manifest_memory=config.manifest_memory,
        default_platform=config.default_platform,
        prefetch=config.prefetch,
    )
    app[ROUTER] = Router(names, upstreams)
    app[PULLTHROUGH] = pullthrough
    app[STORE] = store
    app[STAGING_PROBLEM] = staging.probe_writable
    app[FILLS] = fills
    app[CLUSTER] = cluster
    hosted = Hosted(store, UploadStore(staging), max_manifest_size=config.max_manifest_size,
                    delete_enabled=config.delete_enabled, upload_max_age=config.upload_max_age,
                    limits=UploadLimits(config.max_uploads_per_repository,
                                        config.max_uploads_per_user), space=space)
    app[HOSTED] = hosted
    evictor = Evictor(store, names.is_hosted_key, cluster, in_thread=store.local,
                      forget=pullthrough.forget, max_size=config.max_size, max_age=config.max_age)
    fills.on_filled = evictor.kick
    app[EVICTOR] = evictor
    workers = WorkerStatus(metrics.shared_directory(), app[ROUTER], evictor,
                           data_root=config.storage_root)
    app[WORKER_STATUS] = workers

    def measure_disk() -> None:
        metrics.measure_disk(config.storage_root)

    # (at each metrics flush; the status figures after the requests' counts are folded in)
    sources = [measure_disk, workers.publish]
    for source in sources:
        metrics.add_source(source)
    metrics.announce_build()
    background = [asyncio.create_task(evictor.run_forever()),
                  asyncio.create_task(pullthrough.watch_purges()),
                  asyncio.create_task(_purge_uploads(hosted, config.upload_max_age)),
                  asyncio.create_task(metrics.flush_forever()),
                  *([upgrading] if upgrading is not None else [])]
    try:
        yield
    finally:
        for source in sources:
            metrics.remove_source(source)
        for task in background:
            task.cancel()
        _, stuck = await asyncio.wait(background, timeout=5)
        for task in stuck:  # never let a background task hold up the shutdown
            log.error("background task %s did not stop; leaving it", task.get_coro())
        await pullthrough.close()
        await fills.close()
        await session.close()
        for cache in (tokens, tags, breakers):
            if cache is not None:
                await cache.close()
        await stack.aclose()
