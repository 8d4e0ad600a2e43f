"""Processes of the benchmark: the counting hop and the three systems under test.

Everything listens on 127.0.0.1 only. Every process is started in its own session and
stopped by :meth:`Managed.stop` (SIGTERM, then SIGKILL), which the caller runs from an
``ExitStack`` so that it also happens on an exception or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from tests.support.registry import REGISTRY_BINARY, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
NGINX_BINARY = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """Status of a GET, or None when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def http_text(url: str, timeout: float = 2.0) -> str:
    """Body of a GET as text."""
    with _OPENER.open(url, timeout=timeout) as resp:
        return bytes(resp.read()).decode(errors="replace")


def _tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (by scanning /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces or parentheses: parse after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def peak_rss_kib(root: int) -> int:
    """VmHWM (peak resident set) summed over ``root`` and its descendants."""
    total = 0
    for pid in _tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


class Managed:
    """A subprocess with a log file, a readiness URL and a clean stop."""

    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "process.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        return f"{self.url}/v2/"

    def start(self, timeout: float = 20.0) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.lower().endswith("_proxy") and not k.startswith("REGISTRY_")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the process lifetime
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=REPO_ROOT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"{self.name} exited with {rc} at start-up:\n{self.log_tail()}")
            if http_status(self.ready_url()) == 200:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.ready_url()} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and its workers
                proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        return peak_rss_kib(self.proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


# ---------------------------------------------------------------------------------------
# nginx (the counting hop and the proxy_cache system)
# ---------------------------------------------------------------------------------------
def _nginx_main(workdir: Path, http_body: str, workers: str = "auto") -> str:
    temp = "\n".join(f"    {kind}_temp_path {workdir}/tmp_{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
worker_processes {workers};
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
{temp}
    access_log off;
    keepalive_requests 1000000;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_read_timeout 300s;
    client_max_body_size 0;
{http_body}
}}
"""


class Nginx(Managed):
    """An nginx master in the foreground (``daemon off``) with its workers."""

    name = "nginx"
    conf = ""

    def command(self) -> list[str]:
        conf_path = self.workdir / "nginx.conf"
        conf_path.write_text(self.conf)
        return [NGINX_BINARY, "-p", str(self.workdir), "-e", str(self.workdir / "error.log"),
                "-c", str(conf_path), "-g", "daemon off; master_process on;"]

    def log_tail(self, lines: int = 30) -> str:
        text = super().log_tail(lines)
        with contextlib.suppress(FileNotFoundError):
            text += "\n" + "\n".join(
                (self.workdir / "error.log").read_text(errors="replace").splitlines()[-lines:])
        return text


@dataclass(frozen=True)
class HopLine:
    """One request the hop relayed to the origin."""

    method: str
    path: str
    status: int
    bytes: int


@dataclass(frozen=True)
class HopCount:
    """Upstream traffic of one system during one scenario."""

    requests: int
    blob_gets: int
    bytes: int
    statuses: dict[int, int]


class UpstreamCounter(Protocol):
    """A hop that counts each system's upstream traffic (:class:`CountingHop`, :class:`WanHop`)."""

    def wait_idle(self, timeout: float = 60.0) -> bool: ...
    def mark(self, system: str) -> int: ...
    def count_since(self, system: str, offset: int) -> HopCount: ...


def log_mark(path: Path) -> int:
    """Current end of a hop log."""
    return path.stat().st_size if path.exists() else 0


def log_count(path: Path, offset: int) -> HopCount:
    """Requests and body bytes in a hop log (``METHOD path status bytes`` lines) after ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    lines = []
    for raw in text.splitlines():
        parts = raw.split()
        if len(parts) == 4:
            lines.append(HopLine(parts[0], parts[1], int(parts[2]), int(parts[3])))
    statuses: dict[int, int] = {}
    for line in lines:
        statuses[line.status] = statuses.get(line.status, 0) + 1
    return HopCount(
        requests=len(lines),
        blob_gets=sum(1 for line in lines if line.method == "GET" and "/blobs/" in line.path),
        bytes=sum(line.bytes for line in lines),
        statuses=statuses,
    )


def wait_idle(active: Callable[[], int], timeout: float) -> bool:
    """Wait until ``active()`` (requests in flight through a hop) is 0."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if active() <= 0:
            return True
        time.sleep(0.05)
    return False


class CountingHop(Nginx):
    """One nginx relay in front of the origin, one ``server`` (port + access log) per system.

    ``proxy_buffering off``: it relays, never stores. ``$body_bytes_sent`` is what it sent
    to the system, i.e. what the system pulled from its upstream.
    """

    name = "counting hop (nginx)"

    def __init__(self, workdir: Path, origin_port: int, systems: list[str]) -> None:
        super().__init__(workdir)
        self.ports = {name: free_port() for name in systems}
        servers = "\n".join(f"""\
    server {{
        listen 127.0.0.1:{port};
        access_log {workdir}/hop-{name}.log hop;
        location / {{ proxy_pass http://origin; }}
    }}""" for name, port in self.ports.items())
        self.conf = _nginx_main(workdir, f"""\
    log_format hop '$request_method $uri $status $body_bytes_sent';
    upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 64; }}
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_buffer_size 256k;
    proxy_buffers 8 256k;
    proxy_max_temp_file_size 0;
    server {{
        listen 127.0.0.1:{self.port};
        location = /v2/ {{ return 200 "{{}}"; }}
        location = /status {{ stub_status; }}
    }}
{servers}""")

    def hop_url(self, system: str) -> str:
        return f"http://127.0.0.1:{self.ports[system]}"

    def log_path_of(self, system: str) -> Path:
        return self.workdir / f"hop-{system}.log"

    def mark(self, system: str) -> int:
        """Current end of the system's hop log."""
        return log_mark(self.log_path_of(system))

    def active_requests(self) -> int:
        """Requests in flight through any hop server (``Writing`` minus the status request)."""
        text = http_text(f"{self.url}/status")
        for line in text.splitlines():
            if line.startswith("Reading:"):
                return int(line.split()[3]) - 1
        raise RuntimeError(f"unexpected stub_status output: {text!r}")

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is in flight through the hop (background fills included)."""
        return wait_idle(self.active_requests, timeout)

    def count_since(self, system: str, offset: int) -> HopCount:
        """Requests and bytes the system pulled through its hop since ``offset``."""
        return log_count(self.log_path_of(system), offset)


class WanHop(Managed):
    """The WAN hop (``bench/wanhop.py``, its own process) in front of the origin: one
    listening port per system and one for the direct client, all sharing the modelled
    link; it logs each response as the counting hop does and answers ``/status``."""

    name = "WAN hop"

    def __init__(self, workdir: Path, origin_port: int, columns: list[str], *, rtt_ms: float = 40.0,
                 conn_mibs: float = 25.0, total_mibs: float = 200.0) -> None:
        super().__init__(workdir)
        self.ports = {name: free_port() for name in columns}
        self.origin_port = origin_port
        self.rtt_ms, self.conn_mibs, self.total_mibs = rtt_ms, conn_mibs, total_mibs

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.wanhop", "--control", f"127.0.0.1:{self.port}",
                "--log-dir", str(self.workdir), "--rtt-ms", f"{self.rtt_ms:g}",
                "--conn-mibs", f"{self.conn_mibs:g}", "--total-mibs", f"{self.total_mibs:g}",
                *(f"--listen={name}={port}:127.0.0.1:{self.origin_port}"
                  for name, port in self.ports.items())]

    @property
    def shape(self) -> str:
        def cap(mibs: float) -> str:
            return f"{mibs:g} MiB/s" if mibs else "no cap"

        return f"RTT {self.rtt_ms:g} ms, {cap(self.conn_mibs)} per connection, {cap(self.total_mibs)} in all"

    def hop_url(self, system: str) -> str:
        return f"http://127.0.0.1:{self.ports[system]}"

    def log_path_of(self, system: str) -> Path:
        return self.workdir / f"hop-{system}.log"

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(http_text(f"{self.url}/status"))
        return result

    def mark(self, system: str) -> int:
        return log_mark(self.log_path_of(system))

    def wait_idle(self, timeout: float = 60.0) -> bool:
        return wait_idle(lambda: int(self.status()["active"]), timeout)

    def count_since(self, system: str, offset: int) -> HopCount:
        return log_count(self.log_path_of(system), offset)


class NginxCache(Nginx):
    """nginx ``proxy_cache`` in front of its hop: blobs and manifests by digest kept 7 days,
    manifests by tag 10 s, refreshed in the background (``use_stale updating``, as regproxy's
    ``tag_stale_while_revalidate``); ``proxy_cache_lock`` so one request fills a missing entry."""

    name = "nginx"

    def __init__(self, workdir: Path, upstream: str) -> None:
        super().__init__(workdir)
        hostport = upstream.removeprefix("http://")
        cache = """\
            proxy_cache regcache;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
            proxy_pass http://hop;"""
        self.conf = _nginx_main(workdir, f"""\
    sendfile on;
    tcp_nopush on;
    upstream hop {{ server {hostport}; keepalive 64; }}
    proxy_cache_path {workdir}/cache levels=1:2 keys_zone=regcache:64m max_size=50g inactive=7d
                     use_temp_path=off;
    proxy_ignore_headers Cache-Control Expires Set-Cookie;
    proxy_buffer_size 256k;
    proxy_buffers 16 256k;
    proxy_busy_buffers_size 1m;
    server {{
        listen 127.0.0.1:{self.port};
        location ~ ^/v2/.+/blobs/ {{
            proxy_cache_key $uri;
            proxy_cache_valid 200 7d;
{cache}
        }}
        location ~ ^/v2/.+/manifests/sha256: {{
            proxy_cache_key $uri|$http_accept;
            proxy_cache_valid 200 7d;
{cache}
        }}
        location ~ ^/v2/.+/manifests/ {{
            proxy_cache_key $uri|$http_accept;
            proxy_cache_valid 200 10s;
            proxy_cache_use_stale updating;
            proxy_cache_background_update on;
{cache}
        }}
        location / {{ proxy_pass http://hop; }}
    }}""")


# ---------------------------------------------------------------------------------------
# distribution and regproxy
# ---------------------------------------------------------------------------------------
class Distribution(Managed):
    """``docker-registry`` 2.8 in proxy (pull-through cache) mode with its own storage."""

    name = "distribution"

    def __init__(self, workdir: Path, upstream: str) -> None:
        super().__init__(workdir)
        self.upstream = upstream

    def command(self) -> list[str]:
        conf = self.workdir / "config.yml"
        conf.write_text("\n".join([
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f'    rootdirectory: "{self.workdir / "storage"}"',
            "  cache:",
            "    blobdescriptor: inmemory",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f'  addr: "127.0.0.1:{self.port}"',
            "proxy:",
            f'  remoteurl: "{self.upstream}"',
            "",
        ]))
        return [REGISTRY_BINARY, "serve", str(conf)]


class Regproxy(Managed):
    """Our proxy: ``python -m proxy serve --config`` with one upstream (the hop)."""

    name = "regproxy"

    def __init__(self, workdir: Path, upstream: str, tag_ttl: str = "10s",
                 extra_args: list[str] | None = None) -> None:
        super().__init__(workdir)
        self.upstream = upstream
        self.tag_ttl = tag_ttl
        self.extra_args = list(extra_args or [])

    def command(self) -> list[str]:
        conf = self.workdir / "config.toml"
        conf.write_text(f"""\
[server]
listen = "127.0.0.1:{self.port}"
access_log = false

[storage]
root = "{self.workdir / 'data'}"

[cache]
tag_ttl = "{self.tag_ttl}"

[proxy]
default_upstream = "origin"

[upstreams."origin"]
url = "{self.upstream}"
library_prefix = false
""")
        return [sys.executable, "-m", "proxy", "serve", "--config", str(conf), "--log-level", "WARNING",
                *self.extra_args]
