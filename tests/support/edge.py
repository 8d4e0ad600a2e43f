"""Helpers for the edge tests: TLS-aware proxy processes, htpasswd files, config files."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt

from tests.support.proxyproc import ProxyProcess


def htpasswd_line(user: str, password: str) -> str:
    """An htpasswd entry with the cheapest bcrypt cost, so tests stay fast."""
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}"


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in users.items()))
    return path


def client_context(ca: Path | None) -> ssl.SSLContext:
    """A client context trusting only ``ca`` (or nothing verified when ``None``)."""
    if ca is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(ca))


class EdgeProxy(ProxyProcess):
    """A proxy process started with ``--config``; ready once ``/v2/`` answers anything."""

    def __init__(self, workdir: Path, config: Path, *args: str, tls: bool = True) -> None:
        super().__init__(workdir, "--config", str(config), *args)
        if tls:
            self.url = f"https://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """Any answer from ``/v2/`` counts (401 included), over TLS without verification."""
        handler = urllib.request.HTTPSHandler(context=client_context(None))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), handler)
        try:
            with opener.open(f"{self.url}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
