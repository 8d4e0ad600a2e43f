"""Self-test of tests/support/daemons.py: real dockerd and containerd pull through a mirror.

A real docker-registry plays the mirror here. The daemons' HTTP(S) proxy is a
closed loopback port, so a pull that succeeds was served by the mirror.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemons import (
    CONTAINERD,
    CTR,
    DOCKER_CLI,
    DOCKERD,
    Containerd,
    DockerDaemon,
    e2e_problems,
    go_arch,
    write_hosts_toml,
)
from tests.support.images import PushedImage, PushedIndex, make_tar_layer, push_image, push_index
from tests.support.registry import RegistryProcess, upstream_get_lines

pytestmark = pytest.mark.e2e


def _require(*binaries: str) -> None:
    problems = e2e_problems(*binaries)
    if problems:
        pytest.fail("cannot run real daemons here: " + "; ".join(problems), pytrace=False)


def _other_arch() -> str:
    return "arm64" if go_arch() != "arm64" else "amd64"


ALPINE_LAYER = make_tar_layer({"etc/os-release": b'NAME="regproxy test"\nID=regproxy-test\n'}, seed=1)


async def _push_alpine(session: aiohttp.ClientSession, reg: RegistryProcess) -> PushedImage:
    """``library/alpine:latest``: one real gzip'd tar layer, docker schema2, native arch."""
    return await push_image(
        session,
        reg.url,
        "library/alpine",
        "latest",
        [ALPINE_LAYER],
        schema="docker",
        platform=("linux", go_arch()),
    )


async def _push_multiarch(session: aiohttp.ClientSession, reg: RegistryProcess, repo: str) -> PushedIndex:
    """An OCI index over a foreign-arch and a native-arch image (native second)."""
    images = [
        await push_image(
            session, reg.url, repo, None, [make_tar_layer(seed=10 + i)], schema="oci", platform=plat
        )
        for i, plat in enumerate([("linux", _other_arch()), ("linux", go_arch())])
    ]
    return await push_index(session, reg.url, repo, "latest", images, schema="oci")


async def test_dockerd_pulls_through_mirror(
    fresh_registry: RegistryProcess,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _require(DOCKERD, CONTAINERD, "runc", DOCKER_CLI)
    reg = fresh_registry
    alpine = await _push_alpine(http_session, reg)
    multi = await _push_multiarch(http_session, reg, "library/multi")
    native = multi.images[1]

    with DockerDaemon(tmp_path, reg.url) as dockerd:
        t0 = time.monotonic()
        res = await dockerd.apull("alpine")
        print(f"dockerd: start {dockerd.start_seconds:.2f}s, first pull {time.monotonic() - t0:.2f}s")
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{dockerd.log_tail()}"

        info = await dockerd.aimage_inspect("alpine")
        assert info["Id"] == alpine.config.digest
        assert f"alpine@{alpine.digest}" in info["RepoDigests"]
        assert info["Architecture"] == go_arch()
        assert info["RootFS"]["Layers"] == [ALPINE_LAYER.diff_id]
        assert upstream_get_lines(reg, f"/library/alpine/blobs/{alpine.layers[0].digest}"), \
            "mirror never served the layer"

        res = await dockerd.apull("multi:latest")
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{dockerd.log_tail()}"
        info = await dockerd.aimage_inspect("multi:latest")
        assert info["Id"] == native.config.digest
        assert f"multi@{multi.digest}" in info["RepoDigests"]

        # Not on the mirror: the fallback to Docker Hub must fail (proxy is a closed port).
        res = await dockerd.apull("library/absent:1")
        assert res.returncode != 0
        assert "127.0.0.1:9" in res.stderr, res.stderr

    assert (tmp_path / "dockerd.log").exists()
    assert not dockerd.root.exists(), "daemon state not cleaned up"


async def test_containerd_pulls_through_mirror(
    fresh_registry: RegistryProcess,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _require(CONTAINERD, CTR)
    reg = fresh_registry
    alpine = await _push_alpine(http_session, reg)
    multi = await _push_multiarch(http_session, reg, "library/multi")
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, reg.url)

    with Containerd(tmp_path) as ctrd:
        t0 = time.monotonic()
        res = await ctrd.apull("docker.io/library/alpine:latest", hosts)
        print(f"containerd: start {ctrd.start_seconds:.2f}s, first pull {time.monotonic() - t0:.2f}s")
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{ctrd.log_tail()}"
        assert await ctrd.aimage_digest("docker.io/library/alpine:latest") == alpine.digest
        gets = upstream_get_lines(reg, f"/library/alpine/blobs/{alpine.layers[0].digest}")
        assert gets, "mirror never served the layer"
        assert all("ns=docker.io" in line for line in gets), gets

        res = await ctrd.apull("docker.io/library/multi:latest", hosts)
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{ctrd.log_tail()}"
        assert await ctrd.aimage_digest("docker.io/library/multi:latest") == multi.digest
        # Only the native platform's layer is fetched.
        assert upstream_get_lines(reg, f"/library/multi/blobs/{multi.images[1].layers[0].digest}")
        assert not upstream_get_lines(reg, f"/library/multi/blobs/{multi.images[0].layers[0].digest}")

        res = await ctrd.apull("docker.io/library/absent:1", hosts)
        assert res.returncode != 0
        assert "127.0.0.1:9" in res.stderr, res.stderr

    assert (tmp_path / "containerd.log").exists()
    assert not ctrd.root.exists(), "daemon state not cleaned up"
