"""Helpers for the edge tests: TLS-aware proxy processes, htpasswd files, config files."""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import sys
import time
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

    def start(self, timeout: float = 15.0) -> EdgeProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=Path(__file__).resolve().parents[2],
            )
        handler = urllib.request.HTTPSHandler(context=client_context(None))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), handler)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with opener.open(f"{self.url}/v2/", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # 401 is an answer too
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start:\n{self.log_tail()}")


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return True
        time.sleep(interval)
    return False
