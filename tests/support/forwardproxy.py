"""A real forward (egress) proxy on loopback for tests: Debian's ``tinyproxy``, in the
foreground, logging every request it forwards (``CONNECT host:port`` for https)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from tests.support.processes import StartStop, stop_process
from tests.support.registry import free_port

TINYPROXY = "/usr/bin/tinyproxy"


class TinyProxy(StartStop):
    """``tinyproxy -d`` on a free 127.0.0.1 port; ``requests()`` lists what it forwarded."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "tinyproxy.conf"
        self.log_path = workdir / "tinyproxy.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 10.0) -> TinyProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # no ConnectPort line: CONNECT to any port (the test registries are not on 443)
        self.config_path.write_text(f"Port {self.port}\nListen 127.0.0.1\nAllow 127.0.0.1\n"
                                    "Timeout 60\nMaxClients 50\nLogLevel Connect\n")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        self._proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(self.config_path)],
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited {self._proc.returncode}: {self.log_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tinyproxy did not listen: {self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests(self) -> list[str]:
        """The request lines it forwarded: ``CONNECT 127.0.0.1:5001 HTTP/1.1``,
        ``GET http://127.0.0.1:5001/v2/ HTTP/1.1``."""
        return [line.split("): ", 1)[1] for line in self.log_text().splitlines()
                if "Request (file descriptor" in line and "): " in line]

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
