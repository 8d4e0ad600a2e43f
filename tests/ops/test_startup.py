"""Start-up failures are one line naming the resource and a non-zero exit, as config errors
are (they were 25-58 line tracebacks), and a failing worker does not restart forever."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.registry import free_port

ROOT = Path(__file__).resolve().parents[2]


def _without(*capabilities: str) -> list[str]:
    """A command prefix that runs the child without these capabilities when the tests run
    as root (who has them all), so that it meets the limits an ordinary user meets."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.fail("running as root needs setpriv (util-linux) to drop capabilities")
    return ["setpriv", "--bounding-set=" + ",".join(f"-{c}" for c in capabilities),
            "--inh-caps=" + ",".join(f"-{c}" for c in capabilities)]


def _serve(tmp_path: Path, *args: str, prefix: list[str] | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    args = ("--data-dir", str(tmp_path / "data"), *args) if "--data-dir" not in args else args
    done = subprocess.run([*(prefix or []), sys.executable, "-m", "proxy", "serve", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    return done.returncode, (done.stdout + done.stderr).strip()


def _assert_one_line(code: int, out: str, *phrases: str) -> None:
    assert code == 1, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith("regproxy: "), out
    for phrase in phrases:
        assert phrase in out, out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use(tmp_path, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = _serve(tmp_path, "--listen", f"127.0.0.1:{port}", "--workers", workers)
    _assert_one_line(code, out, f"127.0.0.1:{port}", "server.listen", "already in use")


def test_address_not_on_this_host(tmp_path):
    port = free_port()
    code, out = _serve(tmp_path, "--listen", f"192.0.2.1:{port}")  # TEST-NET-1
    _assert_one_line(code, out, f"192.0.2.1:{port}", "not an address of this host")


def test_data_dir_that_is_a_file(tmp_path):
    target = tmp_path / "data"
    target.write_text("not a directory")
    code, out = _serve(tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(target))
    _assert_one_line(code, out, f"storage.root {target}", "not a directory")
    code, out = _serve(tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
                       str(target / "below"), "--workers", "2")
    _assert_one_line(code, out, f"storage.root {target / 'below'}", "not a directory")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unwritable_data_dir(tmp_path, workers):
    """An existing store the user may not write (root: without CAP_DAC_OVERRIDE)."""
    data = tmp_path / "data"
    for sub in ("", "tmp"):  # a store made earlier by another user, say
        (data / sub).mkdir(exist_ok=True)
    for sub in ("tmp", ""):
        (data / sub).chmod(0o555)
    try:
        code, out = _serve(tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--workers", workers,
                           prefix=_without("dac_override"))
    finally:
        for sub in ("", "tmp"):
            (data / sub).chmod(0o755)
    _assert_one_line(code, out, f"storage.root {data}", "not writable", "ermission denied")


def test_privileged_port_without_privilege(tmp_path):
    """Port 80 as an ordinary user; as root, the child runs without CAP_NET_BIND_SERVICE
    (which is what lets root bind it)."""
    unprivileged_start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if os.geteuid() != 0 and unprivileged_start <= 80:
        pytest.skip(f"net.ipv4.ip_unprivileged_port_start is {unprivileged_start}: "
                    "any user may bind port 80 on this host")
    code, out = _serve(tmp_path, "--listen", "127.0.0.1:80", prefix=_without("net_bind_service"))
    _assert_one_line(code, out, "127.0.0.1:80", "permission denied", "CAP_NET_BIND_SERVICE")
