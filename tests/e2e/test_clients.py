"""End to end: a real Docker daemon (registry-mirrors), containerd (hosts.toml, ?ns=) and
podman (registries.conf mirrors, path prefix) pull through the proxy, each configured only from
``regproxy client-config`` output, on the filesystem and on the S3 backend (dockerd following
presigned redirects to the object store). Their HTTP(S) proxy is a closed loopback port, so a
fallback to the real Docker Hub fails at once: a successful pull proves the proxy served it."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from tests.support.daemons import (
    Containerd,
    DockerDaemon,
    Podman,
    client_config,
    docker_daemon_config,
    go_arch,
    write_hosts_toml,
)
from tests.support.images import make_tar_layer, push_image, push_index
from tests.support.proxyfix import make_config
from tests.support.registry import RegistryProcess, upstream_gets

pytestmark = pytest.mark.e2e

LAYER = make_tar_layer({"etc/os-release": b'NAME="regproxy e2e"\n'}, seed=77)


async def start_mirror(aiohttp_server, reg: RegistryProcess, data: Path,
                       request: pytest.FixtureRequest | None = None, backend: str = "filesystem",
                       also: tuple[str, ...] = ()) -> str:
    """The proxy with a local docker-registry playing Docker Hub (``docker.io``); on the S3
    backend (SeaweedFS), optionally answering blob GETs with presigned 307 redirects."""
    extra = {}
    if backend != "filesystem":
        assert request is not None
        seaweedfs = request.getfixturevalue("seaweedfs")
        extra["s3"] = seaweedfs.s3_config(redirect=backend == "s3-redirect")
    cfg = make_config(data, {"docker.io": reg.url, **dict.fromkeys(also, reg.url)}, **extra)
    server = await aiohttp_server(create_app(cfg))
    return f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize("backend", ["filesystem", "s3-redirect"])
async def test_docker_daemon_pulls_alpine_through_the_proxy(
    aiohttp_server, fresh_registry, http_session: aiohttp.ClientSession, tmp_path, request,
    backend,
):
    reg = fresh_registry
    alpine = await push_image(http_session, reg.url, "library/alpine", "latest", [LAYER],
                              schema="docker", platform=("linux", go_arch()))
    mirror = await start_mirror(aiohttp_server, reg, tmp_path / "data", request, backend)
    conf = docker_daemon_config(mirror, tmp_path / "docker-conf")
    assert conf == {"registry-mirrors": [mirror]}
    with DockerDaemon(tmp_path / "d1", daemon_config=conf) as dockerd:
        res = await dockerd.apull("alpine")
        assert res.returncode == 0, f"{res.stderr}\n{dockerd.log_tail()}"
        info = await dockerd.aimage_inspect("alpine")
        assert info["Id"] == alpine.config.digest
        assert f"alpine@{alpine.digest}" in info["RepoDigests"]
        assert upstream_gets(reg, f"/library/alpine/blobs/{alpine.layers[0].digest}") == 1

        # Second pull with the upstream down: served from the cache alone.
        await dockerd.adocker("rmi", "alpine")
        reg.stop()
        res = await dockerd.apull("alpine")
        assert res.returncode == 0, f"{res.stderr}\n{dockerd.log_tail()}"
        assert (await dockerd.aimage_inspect("alpine"))["Id"] == alpine.config.digest
    reg.start()
    assert upstream_gets(reg, f"/library/alpine/blobs/{alpine.layers[0].digest}") == 1


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
async def test_containerd_pulls_with_ns_through_the_proxy(
    aiohttp_server, fresh_registry, http_session: aiohttp.ClientSession, tmp_path, request,
    backend,
):
    reg = fresh_registry
    alpine = await push_image(http_session, reg.url, "library/alpine", "latest", [LAYER],
                              schema="oci", platform=("linux", go_arch()))
    other = "arm64" if go_arch() != "arm64" else "amd64"
    children = [await push_image(http_session, reg.url, "library/multi", None,
                                 [make_tar_layer(seed=80 + i)], schema="oci",
                                 platform=("linux", arch))
                for i, arch in enumerate([other, go_arch()])]
    multi = await push_index(http_session, reg.url, "library/multi", "latest", children)
    mirror = await start_mirror(aiohttp_server, reg, tmp_path / "data", request, backend,
                                also=("ghcr.io",))
    hosts = tmp_path / "hosts"
    written = write_hosts_toml(hosts, mirror, "docker.io", "ghcr.io")
    assert [p.relative_to(hosts).as_posix() for p in written] == [
        "docker.io/hosts.toml", "ghcr.io/hosts.toml"]
    with Containerd(tmp_path / "c1") as ctrd:
        res = await ctrd.apull("docker.io/library/alpine:latest", hosts)
        assert res.returncode == 0, f"{res.stderr}\n{ctrd.log_tail()}"
        assert await ctrd.aimage_digest("docker.io/library/alpine:latest") == alpine.digest
        res = await ctrd.apull("docker.io/library/multi:latest", hosts)
        assert res.returncode == 0, f"{res.stderr}\n{ctrd.log_tail()}"
        assert await ctrd.aimage_digest("docker.io/library/multi:latest") == multi.digest
        # a second upstream through its own hosts.toml: ?ns=ghcr.io picks it
        res = await ctrd.apull("ghcr.io/library/alpine:latest", hosts, unpack=False)
        assert res.returncode == 0, f"{res.stderr}\n{ctrd.log_tail()}"
        assert await ctrd.aimage_digest("ghcr.io/library/alpine:latest") == alpine.digest
    assert upstream_gets(reg, f"/library/alpine/blobs/{alpine.layers[0].digest}") == 1
    # containerd's ?ns=docker.io did not create a separate cache key
    async with http_session.get(f"{mirror}/v2/_catalog") as r:
        assert await r.json() == {"repositories": ["ghcr.io/library/alpine", "library/alpine",
                                                   "library/multi"]}


async def test_podman_pulls_through_the_proxy_by_path_prefix(
    aiohttp_server, fresh_registry, http_session: aiohttp.ClientSession, tmp_path,
):
    """podman sends no ``ns``: the generated registries.conf mirrors each upstream at
    ``<cache>/<registry>``, and the proxy routes by that prefix."""
    reg = fresh_registry
    alpine = await push_image(http_session, reg.url, "library/alpine", "latest", [LAYER],
                              schema="oci", platform=("linux", go_arch()))
    app = await push_image(http_session, reg.url, "org/app", "1", [make_tar_layer(seed=90)],
                           schema="oci", platform=("linux", go_arch()))
    mirror = await start_mirror(aiohttp_server, reg, tmp_path / "data", also=("ghcr.io",))
    (conf,) = client_config("podman", mirror, tmp_path / "registries.conf.d",
                            "--upstream", "docker.io", "--upstream", "ghcr.io")
    with Podman(conf) as podman:
        res = await podman.apull("docker.io/library/alpine:latest")
        assert res.returncode == 0, res.stderr
        assert await podman.aimage_digest("docker.io/library/alpine:latest") == alpine.digest
        res = await podman.apull("ghcr.io/org/app:1")
        assert res.returncode == 0, res.stderr
        assert await podman.aimage_digest("ghcr.io/org/app:1") == app.digest
    async with http_session.get(f"{mirror}/v2/_catalog") as r:
        assert await r.json() == {"repositories": ["ghcr.io/org/app", "library/alpine"]}
