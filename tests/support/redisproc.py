"""A throw-away ``redis-server`` (Debian package) on loopback for tests.

conftest.py runs one for the session and empties it (``FLUSHALL``) before every test
that asks for ``redis_url``, so tests never see each other's keys.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.support.processes import StartStop, stop_process
from tests.support.registry import free_port


class RedisProcess(StartStop):
    """``redis-server`` without persistence, bound to 127.0.0.1 on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        """``redis-cli -p PORT ARGS...``; its stdout, stripped."""
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=10).stdout.strip()

    def start(self, timeout: float = 10.0) -> RedisProcess:
        server = shutil.which("redis-server")
        assert server, "redis-server is needed (Debian package redis-server)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.cli("ping") != "PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server did not start:\n{log[-2000:]}")
            time.sleep(0.05)
        return self

    def flushall(self) -> None:
        assert self.cli("flushall") == "OK"

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
