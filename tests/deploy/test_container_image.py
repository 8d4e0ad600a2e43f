"""The container image, for real: scripts/build-image.sh builds deploy/Containerfile on a
Debian base made here (mmdebstrap, cached; tests/support/baseimage.py) with the test's own
dockerd, the image runs with a mounted config and an environment override, and that same
dockerd pulls an image through the running container as its registry mirror from a real
docker-registry upstream. Also checked: the OCI labels, the non-root user of PID 1, a
fresh named volume on /data that it can write, the HEALTHCHECK command inside the container
and Docker's own health status, and a clean exit on SIGTERM (`docker stop`)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.baseimage import import_base
from tests.support.daemons import DOCKER_CLI, DockerDaemon, go_arch
from tests.support.images import make_tar_layer, push_image
from tests.support.registry import RegistryProcess, free_port, upstream_gets

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TAG = "regproxy:0.1.0"  # the default tags: regproxy:<version> (deploy/kubernetes names it) and :latest
LAYER = make_tar_layer({"hello.txt": b"pulled through the regproxy container\n"}, seed=1616)


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], within: float = 60.0) -> None:
    """Poll ``check`` until it returns True."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


async def build_image(dockerd: DockerDaemon, base: str) -> None:
    # pip needs the machine's own proxy settings and index (dockerd.env closes the proxies)
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONTEXT", "DOCKER_CONFIG")}
    env.update(DOCKER_HOST=dockerd.host, DOCKER=DOCKER_CLI, DOCKER_CONFIG=dockerd.env["DOCKER_CONFIG"])
    proc = await asyncio.create_subprocess_exec(
        "bash", str(REPO / "scripts" / "build-image.sh"), "--base", base,
        "--source", "https://example.org/regproxy.git",
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(600):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, f"build-image.sh failed:\n{out.decode()[-5000:]}\n{dockerd.log_tail()}"


async def test_image_builds_runs_non_root_and_serves_a_pull(
    upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    reg = upstream_registry
    pushed = await push_image(http_session, reg.url, "library/rpimage", "v1", [LAYER],
                              schema="docker", platform=("linux", go_arch()))
    port = free_port()
    mirror = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nlisten = "0.0.0.0:5000"\n[storage]\nroot = "/data"\n'
                      f'[upstreams."docker.io"]\nurl = "{reg.url}"\n')
    config.chmod(0o644)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with DockerDaemon(tmp_path / "dockerd", mirror, storage_driver="overlay2") as dockerd:
        async def docker(*args: str, check: bool = True, time_limit: float = 120) -> str:
            res = await dockerd.adocker(*args, check=False, time_limit=time_limit)
            assert not check or res.returncode == 0, \
                f"docker {' '.join(args)}: {res.stderr}\n{dockerd.log_tail()}"
            return res.stdout

        base = await asyncio.to_thread(import_base, dockerd)
        timings["base"] = time.monotonic() - t0
        await build_image(dockerd, base)
        timings["build"] = time.monotonic() - t0 - timings["base"]

        image = json.loads(await docker("image", "inspect", TAG))[0]
        assert json.loads(await docker("image", "inspect", "regproxy:latest"))[0]["Id"] == image["Id"]
        cfg = image["Config"]
        labels = cfg["Labels"]
        assert labels["org.opencontainers.image.version"] == "0.1.0"
        assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
        assert labels["org.opencontainers.image.source"] == "https://example.org/regproxy.git"
        assert cfg["User"] == "10001:10001"
        assert "/data" in cfg["Volumes"]
        assert cfg["Entrypoint"] == ["regproxy"]
        health = cfg["Healthcheck"]["Test"]
        assert health[0] == "CMD" and health[1:3] == ["regproxy", "healthcheck"]
        assert len(image["RootFS"]["Layers"]) <= 5, "base + a few layers: the wheelhouse stage is not shipped"
        await docker("run", "--rm", "--network", "none", "--entrypoint", "sh", TAG, "-c",
                     "test ! -e /wheelhouse && ! /opt/regproxy/bin/python -m pip --version 2>/dev/null")

        # The mounted config's upstream, the environment's listen address (host networking:
        # the container's loopback is the test's), a fresh named volume.
        name = "regproxy-e2e"
        try:
            await docker("run", "-d", "--name", name, "--network", "host",
                         "-v", f"{config}:/etc/regproxy/config.toml:ro", "-v", "rp-data:/data",
                         "-e", f"REGISTRY_HTTP_ADDR=127.0.0.1:{port}",
                         "--health-interval", "1s", "--health-start-period", "0s", TAG)

            async def healthy() -> bool:
                state = json.loads(await docker("inspect", name))[0]["State"]
                assert state["Running"], f"container exited: {await docker('logs', name)}"
                return bool(state["Health"]["Status"] == "healthy")

            await wait_for("Docker's health status", healthy)
            # The image's HEALTHCHECK command itself, run inside, follows the env's port.
            await docker("exec", name, *health[1:])
            status = await docker("exec", name, "cat", "/proc/1/status")
            uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
            assert set(uids) == {"10001"}, status
            assert "regproxy serve" in " ".join(
                (await docker("exec", name, "cat", "/proc/1/cmdline")).split("\0"))

            timings["run"] = time.monotonic() - t0 - timings["base"] - timings["build"]
            res = await dockerd.apull("rpimage:v1")
            assert res.returncode == 0, f"{res.stderr}\n{await docker('logs', name)}\n{dockerd.log_tail()}"
            info = await dockerd.aimage_inspect("rpimage:v1")
            assert info["Id"] == pushed.config.digest
            assert upstream_gets(reg, f"/library/rpimage/blobs/{pushed.layers[0].digest}") == 1
            listing = await docker("exec", name, "sh", "-c", "ls -R /data")
            assert pushed.layers[0].digest.split(":")[1] in listing, listing

            t_stop = time.monotonic()
            await docker("stop", "-t", "30", name)
            stopped = time.monotonic() - t_stop
            state = json.loads(await docker("inspect", name))[0]["State"]
            assert state["ExitCode"] == 0, f"exit {state['ExitCode']}: {await docker('logs', name)}"
            assert stopped < 25, f"SIGTERM took {stopped:.1f}s: not handled?"
        finally:
            await docker("rm", "-f", name, check=False)
    timings["total"] = time.monotonic() - t0
    print("container image timings:", {k: round(v, 1) for k, v in timings.items()},
          "on", os.cpu_count(), "CPUs")
