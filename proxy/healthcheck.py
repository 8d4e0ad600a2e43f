"""``regproxy healthcheck``: probe the local server's ``/healthz`` and exit 0 when it answers 200.

A container's ``HEALTHCHECK`` cannot see the server's arguments, so this reads the same config
(file and ``REGISTRY_*``/``REGPROXY_*`` environment) as ``serve`` and probes where that server
listens: the debug listener when there is one (plain HTTP, no auth), else the main port
(HTTPS without verification when ``[tls]`` is set: it is the server's own loopback address).
Proxy variables are ignored: a probe of 127.0.0.1 must never go through ``HTTP_PROXY``.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from proxy.config import Config, ConfigError, load

#: A wildcard bind address is probed on the matching loopback address.
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("healthcheck", help="exit 0 if the local server's /healthz answers (for HEALTHCHECK)")
    p.add_argument("--config", type=Path, help="config.toml (default: embedded defaults)")
    p.add_argument("--url", help="probe this URL instead of the one derived from the config")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(log_level="WARNING")


def probe_url(config: Config) -> str:
    """The ``/healthz`` URL of the server ``config`` describes."""
    if config.debug_listen is not None:
        host, port = config.debug_listen
        scheme = "http"
    else:
        host, port = config.listen_host, config.listen_port
        scheme = "https" if config.tls is not None else "http"
    host = LOOPBACK.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/healthz"


def run(args: argparse.Namespace) -> int:
    """0 when ``/healthz`` answers 200, 1 otherwise (with the reason on stderr), 2 on a config error."""
    url = args.url
    if url is None:
        try:
            url = probe_url(load(args.config))
        except ConfigError as exc:
            print(f"regproxy: config error: {exc}", file=sys.stderr)
            return 2
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=args.timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"regproxy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"regproxy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0
