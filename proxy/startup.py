"""Start-up checks whose failure is one line naming the resource, and an exit status of 1.

What a server needs from its host (a port it may bind, a data directory it may write) is
checked before anything starts, in the process that forks the workers too, so an operator
sees ``regproxy: cannot listen on 0.0.0.0:80 (server.listen): permission denied ...``
instead of a traceback, and workers are not restarted forever for a port they cannot get.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from proxy import __version__
from proxy.config import Config
from proxy.storage.staging import Staging

#: Exit status of a worker process that could not start (it printed why).
EXIT_STARTUP_FAILED = 3


class StartupError(Exception):
    """The server cannot start on this host as configured; the message says why."""


_BIND_REASONS = {
    errno.EADDRINUSE: "address already in use (another process listens on it)",
    errno.EADDRNOTAVAIL: "not an address of this host",
}


def listen_error(key: str, host: str, port: int, exc: OSError) -> StartupError:
    """The one-line error for a failed ``bind`` of ``host:port`` (configured as ``key``)."""
    if isinstance(exc, socket.gaierror):
        reason = f"cannot resolve {host!r} ({exc.strerror})"
    elif exc.errno == errno.EACCES and 0 < port < 1024:
        reason = "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE"
    else:
        reason = _BIND_REASONS.get(exc.errno or 0) or str(exc.strerror or exc).lower()
    shown = f"[{host}]" if ":" in host else host
    return StartupError(f"cannot listen on {shown}:{port} ({key}): {reason}")


def check_listen(host: str, port: int, *, reuse_port: bool, key: str = "server.listen") -> None:
    """Bind ``host:port`` once (as the server will) and let go: a port in use, an address
    not on this host or a privileged port fail here, before anything has started."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
    except OSError as exc:
        raise listen_error(key, host, port, exc) from None


def prepare_store(root: Path) -> None:
    """Create the local store's layout and clean what killed writers left in ``tmp/``
    (once, before any worker starts), and check that it can be written."""
    store = Staging(root)
    try:
        store.open(clean=True)
    except OSError as exc:
        if isinstance(exc, FileExistsError | NotADirectoryError):
            raise StartupError(f"storage.root {root}: not a directory (or below a file)") from None
        raise _unwritable(root, str(exc.strerror or exc)) from None
    problem = store.probe_writable()
    if problem is not None:
        raise _unwritable(root, problem)


def _unwritable(root: Path, reason: str) -> StartupError:
    return StartupError(f"storage.root {root}: not writable: {reason[:1].lower()}{reason[1:]}")


def _size(n: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.4g} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{seconds / factor:g}{unit}"
    return f"{seconds:g}s"


def summary(config: Config) -> str:
    """One line saying what this server is about to be: where it listens, with how many
    workers, which upstreams (the default first), hosted patterns, the cache budget, the
    auth mode and the store (no credentials: URLs are credential-free by validation)."""
    scheme = "https" if config.tls is not None else "http"
    host = f"[{config.listen_host}]" if ":" in config.listen_host else config.listen_host
    ups = sorted(config.upstreams.values(), key=lambda u: u.name != config.default_upstream)
    upstreams = ", ".join(f"{u.name}{' (default)' if u.name == config.default_upstream else ''}"
                          f" {u.url}" for u in ups) or "none"
    budget = ", ".join([f"max_size {_size(config.max_size)}" if config.max_size else "no size limit",
                        f"max_age {_duration(config.max_age)}" if config.max_age else "no age limit"])
    if config.auth is None:
        auth = "none (anyone may pull and push)" if config.hosted else "none"
    else:
        auth = config.auth.mode + (f", anonymous pull of {', '.join(config.auth.anonymous_pull)}"
                                   if config.auth.anonymous_pull else "")
    storage = (f"s3 bucket {config.s3.bucket}, scratch in {config.storage_root}" if config.s3
               else str(config.storage_root))
    return (f"regproxy {__version__}: {scheme}://{host}:{config.listen_port}, "
            f"{config.workers} worker{'s' if config.workers != 1 else ''}; upstreams: {upstreams}; "
            f"hosted: {', '.join(config.hosted) or 'none'}; cache budget: {budget}; "
            f"auth: {auth}; storage: {storage}")
