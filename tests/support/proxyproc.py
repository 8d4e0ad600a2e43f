"""Run the proxy as a real process (``python -m proxy serve``), as users do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.processes import StartStop, stop_process
from tests.support.registry import free_port

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProxyProcess(StartStop):
    """``regproxy serve`` in a subprocess on a free loopback port; logs go to a file.
    ``env`` is added to the environment (which has no ``*_proxy`` variables otherwise)."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = workdir / "proxy.log"
        self.args = ["--listen", self.host, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=Path(__file__).resolve().parents[2],
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start:\n{self.log_tail()}")

    def ready(self) -> bool:
        """Whether the server answers ``/v2/`` (with a 200)."""
        try:
            with _OPENER.open(f"{self.url}/v2/", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def peak_rss_kib(self) -> int:
        """VmHWM of the process: the peak resident memory so far."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
