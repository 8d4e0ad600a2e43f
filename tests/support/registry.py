"""Run a real ``docker-registry`` (distribution 2.8) on 127.0.0.1 for tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Any

from tests.support.processes import StartStop, stop_process

REGISTRY_BINARY = os.environ.get("DOCKER_REGISTRY_BIN", "/usr/bin/docker-registry")
# Ignore any http_proxy/https_proxy in the environment: everything is loopback.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """Return a currently unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RegistryError(RuntimeError):
    """The registry process failed to start or answer."""


class RegistryProcess(StartStop):
    """A docker-registry subprocess with filesystem storage under ``workdir``.

    The port and storage directory are fixed at construction time so that
    ``stop()`` followed by ``start()`` brings back the same registry (used to
    simulate upstream outages).
    """

    def __init__(
        self,
        workdir: Path | str,
        port: int | None = None,
        *,
        startup_timeout: float = 15.0,
        extra_env: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.storage_dir = self.workdir / "storage"
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        #: (certificate, key) to serve HTTPS with; ``url`` is then https
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:5000`` (``https://`` with ``tls``)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        # Hand-written YAML (no PyYAML dependency). http.debug is absent, so the
        # debug server is disabled.
        self.config_path.write_text(
            "\n".join(
                [
                    "version: 0.1",
                    "log:",
                    "  level: info",
                    "  formatter: text",
                    "  accesslog:",
                    "    disabled: false",
                    "storage:",
                    "  filesystem:",
                    f'    rootdirectory: "{self.storage_dir}"',
                    "  delete:",
                    "    enabled: true",
                    "  cache:",
                    "    blobdescriptor: inmemory",
                    "  maintenance:",
                    "    uploadpurging:",
                    "      enabled: false",
                    "http:",
                    f'  addr: "127.0.0.1:{self.port}"',
                    *([] if self.tls is None else [
                        "  tls:", f'    certificate: "{self.tls[0]}"', f'    key: "{self.tls[1]}"']),
                    "  headers:",
                    "    X-Content-Type-Options: [nosniff]",
                    "",
                ]
            )
        )

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the registry log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def ready(self) -> bool:
        """Whether ``/v2/`` answers 200 now."""
        return self._ping()

    def _ping(self) -> bool:
        try:
            opener = _NO_PROXY_OPENER
            if self.tls is not None:  # readiness only: any certificate will do
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                     urllib.request.HTTPSHandler(context=ctx))
            with opener.open(f"{self.url}/v2/", timeout=1.0) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError as err:  # with REGISTRY_AUTH set: it answers, with a 401
            return err.code == 401
        except (urllib.error.URLError, OSError, ConnectionError):
            return False

    def start(self) -> RegistryProcess:
        """Start the registry (same port/storage as before) and wait until ``/v2/`` answers 200."""
        if self.running:
            return self
        env = {**os.environ, **self.extra_env}
        # Stop the registry from picking up ambient REGISTRY_* overrides.
        for key in list(env):
            if key.startswith("REGISTRY_") and key not in self.extra_env:
                del env[key]
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self._log_file = log
        self._proc = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._cleanup()
                raise RegistryError(
                    f"docker-registry exited with {rc} during startup; log tail:\n{self.log_tail()}"
                )
            if self._ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RegistryError(
            f"docker-registry did not answer GET /v2/ on {self.url} within "
            f"{self.startup_timeout}s; log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the registry: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        stop_process(self._proc, grace=timeout)
        self._cleanup()
        # Wait until the port is really free so a restart can bind it again.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._port_in_use():
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP the registry: it still accepts connections (the kernel does) and never
        answers, as a hung upstream does."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`: it answers what queued up meanwhile."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> RegistryProcess:
        """Stop then start again on the same port and storage."""
        self.stop()
        return self.start()

    def _port_in_use(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def _cleanup(self) -> None:
        self._proc = None
        log = self._log_file
        self._log_file = None
        if log is not None:
            log.close()



_GET = re.compile(r'"GET (/v2/\S+) HTTP')


def upstream_get_lines(registry: RegistryProcess, path_fragment: str = "") -> list[str]:
    """The registry's access-log lines of GET requests whose path contains the fragment."""
    return [line for line in registry.log_path.read_text(errors="replace").splitlines()
            if (m := _GET.search(line)) and path_fragment in m.group(1)]


_REQUEST = re.compile(r'"([A-Z]+) (/v2/\S+) HTTP')


def upstream_requests(registry: RegistryProcess, path_fragment: str = "") -> int:
    """How many requests (any method) for such a path the upstream registry logged."""
    return sum(1 for line in registry.log_path.read_text(errors="replace").splitlines()
               if (m := _REQUEST.search(line)) and path_fragment in m.group(2))


def upstream_gets(registry: RegistryProcess, path_fragment: str = "") -> int:
    """How many GET requests for such a path the upstream registry logged."""
    return len(upstream_get_lines(registry, path_fragment))


async def upstream_settled(session: Any, reg: RegistryProcess) -> None:
    """Wait until the registry logged every request made so far: it logs a request once
    answered, so a marker request sent now, once logged, comes after all earlier ones."""
    marker = f"/v2/settled-marker-{uuid.uuid4().hex}/tags/list"
    async with session.get(f"{reg.url}{marker}") as r:
        assert r.status == 404
    deadline = asyncio.get_running_loop().time() + 10
    while upstream_requests(reg, marker) == 0:
        assert asyncio.get_running_loop().time() < deadline, reg.log_tail()
        await asyncio.sleep(0.02)
