"""Running the server: one process, or several workers sharing the port (SO_REUSEPORT).

Workers share everything that matters through the store: blobs, manifests and tags are
files, and an in-progress fill is a locked file in ``tmp/`` that any worker can tail, so
single flight holds across workers. Only the parent cleans ``tmp/`` at start, before the
workers exist.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web

from proxy import layout, metrics
from proxy.accesslog import AccessLogger, start_request
from proxy.app import SERVER_LIMITS, create_app
from proxy.config import Config
from proxy.forwarded import ClientAddresses
from proxy.httpserver import PrepareRequest, serve
from proxy.layout import LayoutError
from proxy.startup import EXIT_STARTUP_FAILED, StartupError, summary
from proxy.tls import SSL_CONTEXT

log = logging.getLogger("regproxy")

#: Where the workers keep their metrics samples and status figures, under storage.root.
METRICS_DIR = "metrics"
#: Seconds a worker gets after the shutdown grace for the app's cleanup (cancelling fills,
#: closing the store) before the parent kills it.
CLEANUP_TIMEOUT = 30.0


def runner_kwargs(config: Config) -> dict[str, Any]:
    """aiohttp runner settings: the access-log hook always runs (it records the request
    metrics); its log lines are off unless ``server.access_log`` is true."""
    logger = logging.getLogger("regproxy.access")
    if not config.access_log:
        logger.setLevel(logging.WARNING)
    return {"access_log_class": AccessLogger, "access_log": logger,
            "access_log_format": config.log_format}


def request_preparation(config: Config) -> PrepareRequest | None:
    """What every request goes through before its handler: the client address behind
    trusted proxies, and the access log's notes; ``None`` when neither is configured."""
    steps: list[PrepareRequest] = []
    if config.trusted_proxies:
        steps.append(ClientAddresses(config.trusted_proxies).resolve)
    if config.access_log:
        steps.append(start_request)
    if len(steps) <= 1:
        return steps[0] if steps else None
    first, second = steps

    def both(request: web.BaseRequest) -> web.BaseRequest:
        return second(first(request))

    return both


def _run_worker(config: Config, **extra: Any) -> None:
    """A worker process: serve, or say in one line why it cannot start and exit with
    :data:`EXIT_STARTUP_FAILED`, which tells the parent not to restart it."""
    try:
        _run_app(config, clean=False, reuse_port=True, **extra)
    except (StartupError, LayoutError) as exc:
        print(f"regproxy: worker {os.getpid()}: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STARTUP_FAILED)


def _run_app(config: Config, *, clean: bool, reuse_port: bool, **extra: Any) -> None:
    # SIGHUP reloads the TLS certificate (the reloader installs its handler when TLS is
    # on); otherwise it must not kill the process, as its default action would (log
    # rotation sends it)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = create_app(config, clean_tmp=clean)
    ssl_context = app.get(SSL_CONTEXT)
    scheme = "https" if ssl_context is not None else "http"
    serve(
        app,
        host=config.listen_host,
        port=config.listen_port,
        reuse_port=reuse_port,
        ssl_context=ssl_context,
        on_listening=lambda: _listening(config, scheme, worker=reuse_port),
        shutdown_timeout=config.shutdown_grace,
        prepare_request=request_preparation(config),
        **runner_kwargs(config),
        **{**SERVER_LIMITS, **extra},
    )


def _listening(config: Config, scheme: str, *, worker: bool) -> None:
    """Where it listens, after the summary of what it serves (one process; with workers
    the parent logs that once), now that it could start."""
    if not worker:
        log.info("%s", summary(config))
    log.info("listening on %s://%s:%d (pid %d), data in %s", scheme, config.listen_host,
             config.listen_port, os.getpid(), config.storage_root)


def run(config: Config, **extra: Any) -> int:
    """Serve until SIGTERM/SIGINT; ``extra`` are connection settings (aiohttp's
    ``RequestHandler`` arguments), as for :func:`aiohttp.web.run_app`. The store was
    prepared (:func:`proxy.startup.prepare_store`). The exit status: 1 when the workers
    could not start (each said why)."""
    if config.workers <= 1:
        _run_app(config, clean=False, reuse_port=False, **extra)
        return 0
    asyncio.run(layout.upgrade_before_workers(config))
    metrics.share_between_processes(config.storage_root / METRICS_DIR)
    log.info("%s", summary(config))  # (once, not per worker, and only when it can start)
    ctx = multiprocessing.get_context("fork")
    stopping = failed = False

    def spawn() -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_run_worker, args=(config,), kwargs=extra, daemon=False)
        proc.start()
        return proc

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping and not failed:
            log.info("%s: stopping %d workers (they get %g s to finish their requests)",
                     signal.Signals(signum).name, len(workers), config.shutdown_grace)
        stopping = True
        for proc in workers:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    workers = [spawn() for _ in range(config.workers)]

    def reload(_signum: int, _frame: object) -> None:
        for proc in workers:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    log.info("started %d workers on %s:%d", config.workers, config.listen_host, config.listen_port)
    while True:
        for i, proc in enumerate(workers):
            if not proc.is_alive() and not stopping:
                if proc.exitcode == EXIT_STARTUP_FAILED:  # it would fail again: give up
                    failed = True
                    stop(signal.SIGTERM, None)
                    break
                log.error("worker %s exited with %s; restarting it", proc.pid, proc.exitcode)
                if proc.pid is not None:
                    metrics.forget_process(proc.pid)
                time.sleep(0.5)
                workers[i] = spawn()
        if stopping:
            deadline = time.monotonic() + config.shutdown_grace + CLEANUP_TIMEOUT
            for proc in workers:
                proc.join(max(deadline - time.monotonic(), 0.0))
                if proc.is_alive():
                    log.error("worker %s did not stop in time; killing it", proc.pid)
                    proc.kill()
                    proc.join()
            return 1 if failed else 0
        time.sleep(0.2)
