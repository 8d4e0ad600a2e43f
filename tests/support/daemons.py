"""Real Docker daemon and containerd instances for end-to-end tests.

Each daemon runs as root with its own data/exec roots and sockets in a short
private ``/tmp/dock-*`` or ``/tmp/cont-*`` directory (unix socket paths must stay
under ~108 bytes), with ``HTTP(S)_PROXY`` pointed at a closed loopback port so
that any fallback to the real Docker Hub fails at once: a successful pull proves
the mirror served it.  ``stop()`` (and leaving the context manager) kills every
process started for that directory, unmounts anything below it, copies the
daemon log into ``tmpdir`` and deletes the directory, also when start-up failed.

The client calls come in a blocking flavour (``pull``) and an asyncio flavour
(``apull``); use the latter when the mirror runs in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Self

from tests.support.processes import StartStop, stop_process

DOCKERD = "dockerd"
CONTAINERD = "containerd"
CTR = "ctr"
# The Debian docker.io CLI matches the daemon; fall back to whatever is on PATH.
DOCKER_CLI = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
#: Nothing listens here: a daemon that tries the real registry fails at once.
CLOSED_PROXY = "http://127.0.0.1:9"

_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
}


Result = subprocess.CompletedProcess[str]


class DaemonError(RuntimeError):
    """A daemon failed to start, or a client command failed."""


def go_arch() -> str:
    """Go architecture name of this machine (``uname -m`` x86_64 -> amd64, aarch64 -> arm64)."""
    machine = platform.machine().lower()
    return _GO_ARCH.get(machine, machine)


def daemon_env() -> dict[str, str]:
    """Environment for daemons and clients: proxies point at a closed port, loopback exempt."""
    env = dict(os.environ)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[key] = CLOSED_PROXY
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = "127.0.0.1,localhost,::1"
    for key in (
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "DOCKER_CONFIG",
        "CONTAINERD_ADDRESS",
        "CONTAINERD_NAMESPACE",
    ):
        env.pop(key, None)
    parts = [p for p in env.get("PATH", "").split(":") if p]
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if extra not in parts:
            parts.append(extra)
    env["PATH"] = ":".join(parts)
    return env


def missing_binaries(*names: str) -> list[str]:
    """The names in ``names`` that are not on the daemons' PATH."""
    path = daemon_env()["PATH"]
    return [n for n in names if shutil.which(n, path=path) is None]


def e2e_problems(*binaries: str) -> list[str]:
    """Reasons why real daemons cannot run here (empty list: they can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (daemons need mounts and cgroups)")
    missing = missing_binaries(*binaries)
    if missing:
        problems.append(
            f"missing binaries {missing} (apt-get install docker.io containerd runc docker-registry)"
        )
    return problems


# --------------------------------------------------------------------------- plumbing


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _unix_socket_ready(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _pids_referencing(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (a private temp dir of ours)."""
    needle = marker.encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry))
    return pids


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        parts = line.split()
        if len(parts) < 5:
            continue
        point = parts[4].replace("\\040", " ")
        if point + "/" == prefix or point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _kill_and_wait(pids: Sequence[int], sig: int, timeout: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.05)


async def run_bounded(args: list[str], env: dict[str, str], time_limit: float) -> Result:
    """Run a client command with its output captured, killed after ``time_limit`` s."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env)
    try:
        async with asyncio.timeout(time_limit):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    rc = proc.returncode if proc.returncode is not None else -1
    return Result(args, rc, out.decode(errors="replace"), err.decode(errors="replace"))


def _check(res: subprocess.CompletedProcess[str], what: str, log: str) -> Result:
    if res.returncode != 0:
        raise DaemonError(
            f"{what} failed ({res.returncode}):\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}\n"
            f"daemon log tail:\n{log}"
        )
    return res


class _Daemon(StartStop):
    """Start/stop/cleanup shared by DockerDaemon and Containerd."""

    name = "daemon"
    sock: Path  #: its API socket (set by the subclass)

    def __init__(self, tmpdir: Path | str | None = None) -> None:
        # State lives in a short private dir under /tmp (socket path limit);
        # ``tmpdir`` (e.g. pytest's tmp_path) receives a copy of the log on stop.
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.name[:4]}-", dir="/tmp"))
        self.log_dir = Path(tmpdir) if tmpdir is not None else None
        self.log_path = self.root / f"{self.name}.log"
        self.env = daemon_env()
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds from spawning to the daemon answering its API (set by start()).
        self.start_seconds: float | None = None
        self._log_file: IO[bytes] | None = None

    # subclass hooks -----------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _version_command(self) -> list[str]:
        """A client command that succeeds once the daemon answers on ``self.sock``."""
        raise NotImplementedError

    def _ready(self) -> bool:
        if not _unix_socket_ready(self.sock):
            return False
        res = subprocess.run(self._version_command(), capture_output=True, env=self.env,
                             timeout=10, check=False)
        return res.returncode == 0

    # lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start the daemon and wait until its API answers; raise DaemonError with its log tail."""
        if self.proc is not None:
            return self
        t0 = time.monotonic()
        try:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.root,
                start_new_session=True,
            )
            while not self._ready():
                if self.proc.poll() is not None:
                    raise DaemonError(
                        f"{self.name} exited with {self.proc.returncode} during start-up; "
                        f"log tail:\n{self.log_tail()}"
                    )
                if time.monotonic() - t0 > timeout:
                    raise DaemonError(
                        f"{self.name} not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the daemon and everything started for it; unmount, save the log, delete state."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, grace=STOP_TIMEOUT)
            # Leftovers in the daemon's session (it was started with setsid).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        # Anything else started for this root (containerd spawned by dockerd, shims).
        marker = str(self.root) + "/"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _pids_referencing(marker)
            if not pids:
                break
            _kill_and_wait(pids, sig, 5.0)
        for point in _mounts_under(self.root):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.log_dir is not None and self.log_path.exists():
            with contextlib.suppress(OSError):
                self.log_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.log_path, self.log_dir / self.log_path.name)
        if not _mounts_under(self.root):
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the daemon's log."""
        return _tail(self.log_path, lines)

    # client helpers -----------------------------------------------------------
    async def _arun(self, args: list[str], time_limit: float, check: bool) -> Result:
        res = await run_bounded(args, self.env, time_limit)
        return _check(res, " ".join(args), self.log_tail()) if check else res


# --------------------------------------------------------------------------- dockerd


class DockerDaemon(_Daemon):
    """A private dockerd (vfs, no iptables/bridge) using ``mirror_url`` as its registry mirror.

    ``storage_driver="overlay2"`` also works here (its mounts are undone by stop()).
    dockerd spawns its own containerd with state under the private exec/data roots.
    An ``http://127.0.0.1:PORT`` (or localhost) mirror needs no ``--insecure-registry``.
    """

    name = "dockerd"

    def __init__(
        self,
        tmpdir: Path | str | None = None,
        mirror_url: str | None = None,
        extra_args: Sequence[str] = (),
        storage_driver: str = "vfs",
        daemon_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tmpdir)
        self.mirror_url = mirror_url
        self.storage_driver = storage_driver
        self.extra_args = list(extra_args)
        self.sock = self.root / "docker.sock"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.config_file = self.root / "daemon.json"
        # ignore /etc/docker/daemon.json; ``daemon_config`` is e.g. client-config's output
        self.config_file.write_text(json.dumps(daemon_config or {}) + "\n")
        client_dir = self.root / "client"
        client_dir.mkdir()
        self.env["DOCKER_CONFIG"] = str(client_dir)  # no ~/.docker credentials

    @property
    def host(self) -> str:
        """Value for ``docker -H``."""
        return f"unix://{self.sock}"

    def _version_command(self) -> list[str]:
        return [DOCKER_CLI, "-H", self.host, "version", "--format", "{{.Server.Version}}"]

    def _command(self) -> list[str]:
        cmd = [
            DOCKERD,
            "--config-file", str(self.config_file),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.root / "docker.pid"),
            "--host", self.host,
            "--storage-driver", self.storage_driver,
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
            "--log-level", "debug",
        ]  # fmt: skip
        if self.mirror_url:
            cmd += ["--registry-mirror", self.mirror_url]
        return cmd + self.extra_args

    async def adocker(self, *args: str, time_limit: float = 120, check: bool = False) -> Result:
        """Run the docker CLI against this daemon (asyncio)."""
        return await self._arun([DOCKER_CLI, "-H", self.host, *args], time_limit, check)

    async def apull(self, ref: str, time_limit: float = 120, check: bool = False) -> Result:
        """``docker pull ref`` (asyncio)."""
        return await self.adocker("pull", ref, time_limit=time_limit, check=check)

    async def aimage_inspect(self, ref: str) -> dict[str, Any]:
        """``docker image inspect ref`` as a dict (asyncio)."""
        res = await self.adocker("image", "inspect", ref, time_limit=30, check=True)
        return dict(json.loads(res.stdout)[0])

# --------------------------------------------------------------------------- containerd

# CRI needs CNI/networking; the others need kernel modules or filesystems absent here.
_CONTAINERD_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class Containerd(_Daemon):
    """A private containerd (own root, state, gRPC socket; CRI disabled).

    Pulls unpack into the ``native`` snapshotter (plain copies, no mounts needed).
    """

    name = "containerd"
    #: containerd namespace used by all ctr calls.
    namespace = "regproxy-e2e"

    def __init__(self, tmpdir: Path | str | None = None, snapshotter: str = "native") -> None:
        super().__init__(tmpdir)
        self.snapshotter = snapshotter
        self.sock = self.root / "containerd.sock"
        self.config_path = self.root / "config.toml"
        disabled = ", ".join(f'"{p}"' for p in _CONTAINERD_DISABLED_PLUGINS)
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{self.root / "root"}"\n'
            f'state = "{self.root / "state"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f'  address = "{self.sock}"\n'
            "[ttrpc]\n"
            f'  address = "{self.sock}.ttrpc"\n'
            "[debug]\n"
            f'  address = "{self.root / "debug.sock"}"\n'
            '  level = "debug"\n'
            "[metrics]\n"
            '  address = ""\n'
        )

    def _version_command(self) -> list[str]:
        return [CTR, "--address", str(self.sock), "version"]

    def _command(self) -> list[str]:
        return [CONTAINERD, "--config", str(self.config_path)]

    def _ctr_args(self, args: Sequence[str]) -> list[str]:
        return [CTR, "--address", str(self.sock), "--namespace", self.namespace, *args]

    async def actr(self, *args: str, time_limit: float = 120, check: bool = False) -> Result:
        """Run ``ctr`` against this containerd in the test namespace (asyncio)."""
        return await self._arun(self._ctr_args(args), time_limit, check)

    def _pull_args(self, ref: str, hosts_dir: Path | str, unpack: bool) -> list[str]:
        if unpack:
            return ["images", "pull", "--snapshotter", self.snapshotter, "--hosts-dir", str(hosts_dir), ref]
        return ["content", "fetch", "--hosts-dir", str(hosts_dir), ref]

    async def apull(
        self,
        ref: str,
        hosts_dir: Path | str,
        unpack: bool = True,
        time_limit: float = 120,
        check: bool = False,
    ) -> Result:
        """Asyncio flavour of :meth:`pull`."""
        return await self.actr(*self._pull_args(ref, hosts_dir, unpack), time_limit=time_limit, check=check)

    @staticmethod
    def _parse_images(stdout: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = parts[2]
        return out

    async def aimages(self) -> dict[str, str]:
        """Asyncio flavour of :meth:`images`."""
        return self._parse_images((await self.actr("images", "ls", time_limit=30, check=True)).stdout)

    async def aimage_digest(self, ref: str) -> str | None:
        """Asyncio flavour of :meth:`image_digest`."""
        return (await self.aimages()).get(ref)

# --------------------------------------------------------------------------- podman

PODMAN = "podman"


class Podman:
    """Rootful podman with private storage (vfs) in a short ``/tmp/podm-*`` directory and
    ``registries_conf`` as its only registries.conf (``CONTAINERS_REGISTRIES_CONF``).
    Daemonless: each call is one process; ``close()`` deletes the storage."""

    def __init__(self, registries_conf: Path | str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="podm-", dir="/tmp"))
        self.env = daemon_env()
        self.env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
        auth = self.root / "auth.json"
        auth.write_text('{"auths": {}}\n')
        self.env["REGISTRY_AUTH_FILE"] = str(auth)  # no ambient credentials

    def _args(self, args: Sequence[str]) -> list[str]:
        return [PODMAN, "--root", str(self.root / "root"), "--runroot", str(self.root / "run"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                "--events-backend", "none", *args]

    async def apodman(self, *args: str, time_limit: float = 120, check: bool = False) -> Result:
        """Run podman with this storage and registries.conf (asyncio)."""
        res = await run_bounded(self._args(args), self.env, time_limit)
        return _check(res, " ".join(res.args), "") if check else res

    async def apull(self, ref: str, time_limit: float = 120, check: bool = False) -> Result:
        """``podman pull ref`` (asyncio)."""
        return await self.apodman("pull", ref, time_limit=time_limit, check=check)

    async def aimage_digest(self, ref: str) -> str:
        """The manifest digest podman recorded for ``ref``."""
        res = await self.apodman("image", "inspect", "--format", "{{.Digest}}", ref, check=True)
        return res.stdout.strip()

    def close(self) -> None:
        for point in _mounts_under(self.root):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client_config(client: str, url: str, dest: Path | str, *args: str) -> list[Path]:
    """Run ``regproxy client-config CLIENT --url URL --dir DEST ARGS``: the tests configure
    real clients only from what the command generates. The files written, sorted."""
    dest = Path(dest)
    before = set(dest.rglob("*")) if dest.exists() else set()
    res = subprocess.run(
        [sys.executable, "-m", "proxy", "client-config", client, "--url", url, "--dir", str(dest), *args],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    if res.returncode != 0:
        raise DaemonError(f"regproxy client-config {client} failed ({res.returncode}): {res.stderr}")
    return sorted(p for p in dest.rglob("*") if p.is_file() and p not in before)


def write_hosts_toml(hosts_dir: Path | str, mirror_url: str, *upstreams: str) -> list[Path]:
    """containerd's ``hosts_dir/<upstream>/hosts.toml`` files (default upstream docker.io),
    from ``regproxy client-config containerd``: the mirror as pull/resolve host."""
    args = [a for u in upstreams for a in ("--upstream", u)]
    return client_config("containerd", mirror_url, hosts_dir, *args)


def docker_daemon_config(mirror_url: str, tmp: Path | str) -> dict[str, Any]:
    """The daemon.json keys ``regproxy client-config docker`` generates for ``mirror_url``."""
    (path,) = client_config("docker", mirror_url, tmp)
    return dict(json.loads(path.read_text()))


__all__ = [
    "CLOSED_PROXY",
    "Containerd",
    "DaemonError",
    "DockerDaemon",
    "Podman",
    "client_config",
    "daemon_env",
    "docker_daemon_config",
    "e2e_problems",
    "go_arch",
    "missing_binaries",
    "write_hosts_toml",
]
