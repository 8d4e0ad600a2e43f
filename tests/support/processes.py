"""The helper processes the tests start (registries, daemons, the proxy, redis, tinyproxy,
SeaweedFS): stopped the one same way, and used as context managers the one same way."""

from __future__ import annotations

import subprocess
from typing import Any, Self

#: After SIGKILL a process is gone at once unless stuck in the kernel: fail, do not hang.
KILLED_WAIT = 10.0


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it still runs ``grace`` seconds later; reaped before this
    returns, so its port and files are free for whatever starts next."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(KILLED_WAIT)


class StartStop:
    """``with Helper(...) as helper:``: ``start()`` on entry (``as`` gets what it returns),
    ``stop()`` on the way out, also when the body raises."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
