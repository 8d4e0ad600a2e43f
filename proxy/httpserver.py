"""Serving the application, with requests aiohttp's HTTP parser refuses answered quietly.

aiohttp answers a request it cannot parse (an over-long request line or header, a control
character in a header, a bad Content-Length, too many headers) from
``RequestHandler.handle_error``: an ``ERROR`` line with a traceback whose message quotes the
offending bytes, credentials included, and a text/plain 400 echoing them. Anyone can send
such requests at line rate and fill the disk with the log. Here they get an OCI error body,
and the log gets at most one short WARNING a second naming only the client and the kind of
error, then a count of the ones it left out (no access-log line each; the metrics count
them). aiohttp has no hook for this answer
(aio-libs/aiohttp#3287), so :class:`EdgeRunner` builds the server's connections from
:class:`EdgeRequestHandler`, and :func:`serve` runs it in place of ``web.run_app``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError

from proxy.accesslog import UNLOGGED
from proxy.app import COMMON_HEADERS, CSP, DEFAULT_CSP
from proxy.errors import RegistryError
from proxy.startup import listen_error

log = logging.getLogger("regproxy.http")


class MalformedRequest(RegistryError):
    code, status, default_message = "UNSUPPORTED", 400, "malformed HTTP request"


BODY = MalformedRequest().body()


class ParseErrorReports:
    """Rate-limited WARNINGs for refused requests: the first of a quiet spell is logged at
    once, the ones in the next ``interval`` seconds are counted and reported as a number."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._quiet_after = 0.0  # monotonic time from which a request gets its own line
        self._suppressed = 0
        self._summary: asyncio.TimerHandle | None = None

    def note(self, remote: str | None, kind: str) -> None:
        now = time.monotonic()
        if now >= self._quiet_after and self._summary is None:
            self._quiet_after = now + self.interval
            log.warning("refused a malformed HTTP request from %s (%s)", remote or "unknown", kind)
            return
        self._suppressed += 1
        if self._summary is None:
            self._summary = asyncio.get_running_loop().call_later(
                max(self._quiet_after - now, 0.0), self._report)

    def _report(self) -> None:
        self._summary = None
        count, self._suppressed = self._suppressed, 0
        log.warning("refused %d more malformed HTTP requests in the last %g s", count, self.interval)
        self._quiet_after = time.monotonic() + self.interval  # a flood: one summary a second


class EdgeRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, answering unparseable requests with an OCI error and
    shutting down within one deadline."""

    __slots__ = ("cut_at_shutdown", "reports")

    def __init__(self, manager: web.Server, reports: ParseErrorReports, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.reports = reports
        self.cut_at_shutdown = False

    @property
    def busy(self) -> bool:
        """Whether a request is being handled on this connection."""
        return self._request_in_progress

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Let the request in progress finish within ``timeout`` seconds, then cut it.

        aiohttp's own shutdown waits ``timeout`` for the handler, then cancels only the
        request's body (which a response being written ignores) and waits ``timeout`` again,
        and at last closes the transport, which waits for a slow client to take what is
        queued: twice the grace and more. Here the grace is one deadline; past it the
        connection is aborted and its handler cancelled (aiohttp keeps the connection's task
        in ``_task_handler`` and offers no public handle on it)."""
        try:
            await asyncio.wait_for(super().shutdown(timeout), timeout)
        except TimeoutError:
            self.cut_at_shutdown = True
            task = self._task_handler
            if self.transport is not None:
                self.transport.abort()
            if task is not None and not task.done():
                task.cancel()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # a handler's failure: aiohttp logs it
            return super().handle_error(request, status, exc, message)
        # the exception's message quotes the request's bytes: only its type is logged
        self.reports.note(request.remote, type(exc).__name__)
        resp = web.Response(status=MalformedRequest.status, body=BODY, content_type="application/json",
                            headers=COMMON_HEADERS)
        resp.headers[CSP] = DEFAULT_CSP
        resp[UNLOGGED] = True  # one access-log line per such request would be the flood again
        resp.force_close()
        return resp


#: Called with each new request before it is handled (in the connection's context); may
#: return a replacement (another ``remote``).
PrepareRequest = Callable[[web.BaseRequest], web.BaseRequest]


class EdgeServer(web.Server):
    """aiohttp's low-level server, making :class:`EdgeRequestHandler` connections; with
    ``prepare_request``, every request goes through it first (none: no cost per request)."""

    def __init__(self, app_server: web.Server, reports: ParseErrorReports,
                 prepare_request: PrepareRequest | None = None, **protocol_kwargs: Any) -> None:
        factory = app_server.request_factory
        if prepare_request is not None:
            make = factory

            def factory(*args: Any) -> web.BaseRequest:
                return prepare_request(make(*args))

        super().__init__(app_server.request_handler, request_factory=factory,
                         handler_cancellation=app_server.handler_cancellation, **protocol_kwargs)
        self.reports = reports
        self.protocol_kwargs = protocol_kwargs
        self.protocol_loop = asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        return EdgeRequestHandler(self, self.reports, loop=self.protocol_loop, **self.protocol_kwargs)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Shut every connection down (idle ones at once), saying what it waits for."""
        conns = [c for c in self.connections if isinstance(c, EdgeRequestHandler)]
        busy = sum(c.busy for c in conns)
        if busy:
            log.info("waiting up to %g s for %d request(s) in flight (server.shutdown_grace)",
                     timeout, busy)
        await super().shutdown(timeout)
        cut = sum(c.cut_at_shutdown for c in conns)
        if cut:
            log.warning("shutdown grace of %g s is over: cut %d transfer(s) still in flight",
                        timeout, cut)


class EdgeRunner(web.AppRunner):
    """``web.AppRunner`` whose server is an :class:`EdgeServer`; ``protocol_kwargs`` are the
    connection settings (limits, access log) as for ``web.run_app``."""

    def __init__(self, app: web.Application, *, shutdown_timeout: float = 60.0,
                 prepare_request: PrepareRequest | None = None, **protocol_kwargs: Any) -> None:
        super().__init__(app, shutdown_timeout=shutdown_timeout, **protocol_kwargs)
        self.protocol_kwargs = protocol_kwargs
        self.prepare_request = prepare_request
        self.reports = ParseErrorReports()

    async def _make_server(self) -> web.Server:
        app_server = await super()._make_server()  # starts the application, as AppRunner does
        return EdgeServer(app_server, self.reports, self.prepare_request, **self.protocol_kwargs)


def serve(app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext | None,
          reuse_port: bool, on_listening: Callable[[], None], shutdown_timeout: float,
          prepare_request: PrepareRequest | None = None, **protocol_kwargs: Any) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully: the listener closes
    and in-flight requests get ``shutdown_timeout`` seconds before the app's cleanup."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[signal.Signals] = loop.create_future()

        def on_signal(signum: signal.Signals) -> None:
            if not stop.done():
                stop.set_result(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        runner = EdgeRunner(app, shutdown_timeout=shutdown_timeout, prepare_request=prepare_request,
                            **protocol_kwargs)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port, ssl_context=ssl_context,
                                  reuse_port=reuse_port or None).start()
            except OSError as exc:  # (checked at start-up; another process may have won)
                raise listen_error("server.listen", host, port, exc) from None
            on_listening()
            signum = await stop
            log.info("%s: no longer accepting connections; shutting down", signum.name)
        finally:
            await runner.cleanup()

    asyncio.run(main())
