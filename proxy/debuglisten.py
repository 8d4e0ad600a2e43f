"""``server.debug_listen``: a second, plain-HTTP listener for the status pages, metrics and
probes, without authentication: it belongs on a private network (as distribution's
``http.debug``), so that Prometheus and people can look without an account while the main
listener keeps those pages to itself (they name private repositories and upstreams).

It is a small application of its own that reads the main one's services: started after them
and stopped before them. Every worker binds it with ``SO_REUSEPORT``, like the main port, so
the metrics (aggregated over workers) and probes answer whichever worker takes the connection.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from proxy.config import Config
from proxy.handlers import OPS_PAGES, PROBES, add_catch_all
from proxy.handlers.common import (
    EVICTOR,
    FILLS,
    ROUTER,
    STAGING_PROBLEM,
    STORE,
    WORKER_STATUS,
    method_unsupported,
    oci,
)
from proxy.handlers.console import CONSOLE_CONFIG, CONSOLE_STORAGE, CONSOLE_WARMS
from proxy.startup import listen_error

log = logging.getLogger("regproxy")

#: The (host, port) the debug listener is bound to, set on the main application at start.
DEBUG_ADDRESS: web.AppKey[tuple[str, int]] = web.AppKey("debug_address")
#: The debug paths: the operational pages except ``/`` (an alias of ``/status``), and the probes.
DEBUG_PATHS = {**{p: h for p, h in OPS_PAGES.items() if p != "/"}, **PROBES}
#: How long in-flight debug requests get at shutdown (they are short).
SHUTDOWN_TIMEOUT = 5.0

PrepareHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def debug_app(main: web.Application, on_prepare: PrepareHook) -> web.Application:
    """The application of the debug listener, sharing the started ``main`` one's services."""
    app = web.Application()
    app[ROUTER], app[EVICTOR], app[WORKER_STATUS] = main[ROUTER], main[EVICTOR], main[WORKER_STATUS]
    app[STORE], app[STAGING_PROBLEM] = main[STORE], main[STAGING_PROBLEM]
    if CONSOLE_CONFIG in main:
        app[CONSOLE_CONFIG] = main[CONSOLE_CONFIG]
    # (the console's storage page and warm list: read only here, the actions are not served)
    app[FILLS], app[CONSOLE_STORAGE] = main[FILLS], main[CONSOLE_STORAGE]
    app[CONSOLE_WARMS] = main[CONSOLE_WARMS]
    for path, handler in DEBUG_PATHS.items():
        app.router.add_get(path, oci(handler))
        app.router.add_route("*", path, oci(method_unsupported))
    add_catch_all(app)
    app.on_response_prepare.append(on_prepare)
    return app


def bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound socket for ``host:port``; the error (a ``StartupError``) names the
    config key."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise listen_error("server.debug_listen", host, port, exc) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise listen_error("server.debug_listen", host, port, exc) from None
    return sock


def install(app: web.Application, config: Config, *, on_prepare: PrepareHook,
            limits: Mapping[str, Any]) -> None:
    """With ``server.debug_listen``: start the debug listener with ``app`` (call after the
    services' cleanup context is added, so it starts after them)."""
    if config.debug_listen is None:
        return
    host, port = config.debug_listen

    async def listener(main: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(debug_app(main, on_prepare), access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT, **limits)
        await runner.setup()
        try:
            sock = bind(host, port, reuse_port=config.workers > 1)
            bound = sock.getsockname()
            main[DEBUG_ADDRESS] = (bound[0], bound[1])
            await web.SockSite(runner, sock).start()
            log.info("debug listener (status, metrics, probes; no auth) on http://%s:%d (pid %d)",
                     bound[0], bound[1], os.getpid())
            yield
        finally:
            await runner.cleanup()

    app.cleanup_ctx.append(listener)
