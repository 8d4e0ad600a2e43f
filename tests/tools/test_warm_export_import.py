"""``regproxy warm``, ``export`` and ``import``: a real docker-registry upstream, the proxy
in-process, the tools talking to it over loopback HTTP, skopeo checking the results."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.cli import _build_parser, main
from proxy.settings.auth import parse_auth
from proxy.tools import commands
from proxy.tools.archive import export_images, import_archive
from proxy.tools.client import ImageRef, Platform, ToolError
from proxy.tools.warm import warm
from tests.support.daemons import DockerDaemon, go_arch
from tests.support.edge import write_htpasswd
from tests.support.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    build_config,
    get_manifest,
    make_tar_layer,
    push_image,
    push_index,
    sha256_digest,
)
from tests.support.proxyfix import make_config
from tests.support.registry import RegistryProcess, upstream_gets
from tests.support.skopeo import read_oci_layout_index, skopeo_copy
from tests.support.store import is_stored


async def start_proxy(aiohttp_server, data: Path, reg: RegistryProcess) -> str:
    cfg = make_config(data, {"upstream.test": reg.url}, hosted=("team/**",))
    server = await aiohttp_server(create_app(cfg))
    return f"http://127.0.0.1:{server.port}"


def tar_directory(directory: Path, tarball: Path) -> None:
    """``tarball`` holding ``directory``'s tree at its root, as an OCI-layout archive is."""
    with tarfile.open(tarball, "w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)


def cached(data: Path, digest: str) -> bool:
    return is_stored(data, digest)


async def all_cached(data: Path, digests: list[str]) -> bool:
    """The proxy publishes a blob (fsync, rename) just after its last byte went out: wait a bit."""
    for _ in range(100):
        if all(cached(data, d) for d in digests):
            return True
        await asyncio.sleep(0.05)
    return False


async def push_multiarch(session, reg: RegistryProcess, repo: str, tag: str, seed: int):
    children = [
        await push_image(session, reg.url, repo, None, [make_tar_layer(seed=seed + i),
                                                         make_tar_layer(seed=seed + 10 + i)],
                         schema="oci", platform=plat)
        for i, plat in enumerate([("linux", "amd64"), ("linux", "arm64", "v8")])
    ]
    return await push_index(session, reg.url, repo, tag, children, schema="oci")


# ---------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "path", "reference", "familiar"), [
    ("alpine:3.20", "alpine", "3.20", "alpine"),
    ("alpine", "alpine", "latest", "alpine"),
    ("docker.io/alpine", "library/alpine", "latest", "alpine"),
    ("index.docker.io/library/alpine:edge", "library/alpine", "edge", "alpine"),
    ("ghcr.io/org/img:tag", "ghcr.io/org/img", "tag", "ghcr.io/org/img"),
    ("localhost/app:1", "localhost/app", "1", "localhost/app"),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b", "latest", "127.0.0.1:5000/a/b"),
    ("org/img@sha256:" + "a" * 64, "org/img", "sha256:" + "a" * 64, "org/img"),
])
def test_image_references_map_to_proxy_paths(text, path, reference, familiar):
    ref = ImageRef.parse(text)
    assert (ref.proxy_name, ref.reference, ref.familiar_name) == (path, reference, familiar)


@pytest.mark.parametrize("text", ["Alpine", "alpine:", "a@sha256:abc", "ghcr.io/", "x:bad tag"])
def test_bad_references_are_refused(text):
    with pytest.raises(ToolError):
        ImageRef.parse(text)


def test_platform_matching():
    assert Platform.parse("linux/arm64/v8").matches({"os": "linux", "architecture": "arm64"})
    assert Platform.parse("linux/arm64").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert not Platform.parse("linux/arm/v7").matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    with pytest.raises(ToolError):
        Platform.parse("linux")


# ---------------------------------------------------------------------------
# warm
# ---------------------------------------------------------------------------
async def test_warm_fills_the_cache_is_idempotent_and_serves_offline(
    aiohttp_server, fresh_registry, http_session, tmp_path
):
    reg = fresh_registry
    index = await push_multiarch(http_session, reg, "warm/multi", "v1", seed=300)
    single = await push_image(http_session, reg.url, "warm/single", "v2", [make_tar_layer(seed=320)],
                              schema="docker")
    data = tmp_path / "data"
    proxy = await start_proxy(aiohttp_server, data, reg)
    amd64, arm64 = index.images

    report = await warm(["warm/multi:v1", f"warm/single@{single.digest}"], proxy, jobs=3)
    assert report.ok, report.failed
    assert report.images == ["warm/multi:v1", f"warm/single@{single.digest}"]
    wanted = [amd64.config, *amd64.layers, single.config, *single.layers]
    assert report.blobs == len(wanted)
    assert report.bytes == sum(d.size for d in wanted)
    assert await all_cached(data, [d.digest for d in wanted])
    assert not any(cached(data, d.digest) for d in arm64.layers)  # only the platform asked for
    assert "warmed 2 image(s)" in report.summary()

    gets = upstream_gets(reg)
    again = await warm(["warm/multi:v1", f"warm/single@{single.digest}"], proxy)
    assert again.ok and again.blobs == report.blobs
    assert upstream_gets(reg) == gets  # idempotent: everything came from the cache

    reg.stop()
    host = proxy.removeprefix("http://")
    out = tmp_path / "offline"
    await skopeo_copy(f"docker://{host}/warm/multi:v1", f"oci:{out}", "--preserve-digests")
    assert [m["digest"] for m in read_oci_layout_index(out)["manifests"]] == [amd64.digest]
    for layer in amd64.layers:
        assert (out / "blobs" / "sha256" / layer.digest[7:]).stat().st_size == layer.size


async def test_warm_all_platforms_and_failures_give_a_nonzero_exit(
    aiohttp_server, upstream_registry, http_session, tmp_path
):
    reg = upstream_registry
    index = await push_multiarch(http_session, reg, "warm/every", "v1", seed=340)
    data = tmp_path / "data"
    proxy = await start_proxy(aiohttp_server, data, reg)
    listing = tmp_path / "images.txt"
    listing.write_text("# CI images\nwarm/every:v1   # all of it\n\nwarm/missing:v1\n")
    args = _build_parser().parse_args(["warm", "--from-file", str(listing), "--all-platforms",
                                       "--proxy", proxy, "--no-progress", "--jobs", "2"])
    assert await commands._run(args) == 1  # warm/missing failed, the rest was still warmed
    for image in index.images:
        assert await all_cached(data, [d.digest for d in [image.config, *image.layers]])

    report = await warm(["warm/every:v1"], proxy, platforms=["windows/amd64"])
    assert not report.ok and "no manifest for platform windows/amd64" in report.failed[0][1]


async def flaky_registry(aiohttp_server) -> tuple[str, bytes, dict[str, int]]:
    """A registry serving ``flaky:1`` whose layer GET fails first with a 503, then is cut
    mid-body, then succeeds (every time fails once ``attempts["broken"]`` is set): (its
    URL, the layer, the attempts counter)."""
    blob = b"x" * 3_000_000
    digest = sha256_digest(blob)
    config = b"{}"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha256_digest(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": digest, "size": len(blob)}]}).encode()
    attempts = {"blob": 0}

    async def manifests(request: web.Request) -> web.Response:
        return web.Response(body=manifest, content_type="application/vnd.oci.image.manifest.v1+json")

    async def blobs(request: web.Request) -> web.StreamResponse:
        if request.match_info["digest"] == sha256_digest(config):
            return web.Response(body=config)
        attempts["blob"] += 1
        if attempts["blob"] == 1 or attempts.get("broken"):
            return web.Response(status=503)
        resp = web.StreamResponse(headers={"Content-Length": str(len(blob))})
        await resp.prepare(request)
        if attempts["blob"] == 2:  # cut mid-body
            await resp.write(blob[:100_000])
            request.transport.close()
            return resp
        await resp.write(blob)
        return resp

    app = web.Application()
    app.router.add_get("/v2/flaky/manifests/{ref}", manifests)
    app.router.add_get("/v2/flaky/blobs/{digest}", blobs)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", blob, attempts


async def test_warm_retries_a_failed_blob(aiohttp_server):
    url, blob, attempts = await flaky_registry(aiohttp_server)
    report = await warm(["flaky:1"], url, progress=True)  # rich bars
    assert report.ok, report.failed
    assert attempts["blob"] == 3 and report.bytes == len(blob) + len(b"{}")

    attempts["broken"] = 1  # fails every time now
    report = await warm(["flaky:1"], url, retries=1)
    assert not report.ok and "HTTP 503" in report.failed[0][1]


async def test_export_retries_a_cut_blob_and_writes_its_member_once(aiohttp_server, tmp_path):
    """The attempt cut mid-body has written part of the layer's member: it is cut off
    again, so the archive holds the layer once, whole, and nothing after it is shifted."""
    url, blob, attempts = await flaky_registry(aiohttp_server)
    tarball = tmp_path / "flaky.tar"
    report = await export_images(["flaky:1"], tarball, url)
    assert attempts["blob"] == 3 and report.blobs == 2 and report.bytes == len(blob) + len(b"{}")
    with tarfile.open(tarball) as tar:
        layer = f"blobs/sha256/{sha256_digest(blob).split(':', 1)[1]}"
        assert tar.getnames().count(layer) == 1
        assert tar.extractfile(layer).read() == blob
        assert json.load(tar.extractfile("manifest.json"))[0]["RepoTags"] == ["flaky:1"]

    attempts["broken"] = 1  # fails every time now: no archive, no partial file
    with pytest.raises(ToolError, match="HTTP 503"):
        await export_images(["flaky:1"], tmp_path / "broken.tar", url, retries=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flaky.tar"]


# ---------------------------------------------------------------------------
# export / import
# ---------------------------------------------------------------------------
async def test_export_is_a_docker_archive_and_an_oci_archive_and_imports_back(
    aiohttp_server, upstream_registry, http_session, tmp_path
):
    reg = upstream_registry
    index = await push_multiarch(http_session, reg, "exp/multi", "v1", seed=400)
    docker_img = await push_image(http_session, reg.url, "exp/docker", "v2",
                                  [make_tar_layer(seed=420), make_tar_layer(seed=421)], schema="docker")
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", reg)
    tarball = tmp_path / "images.tar"
    report = await export_images(["exp/multi:v1", "exp/docker:v2"], tarball, proxy)
    amd64 = index.images[0]
    assert report.blobs == 2 + len(amd64.layers) + len(docker_img.layers)
    assert not tarball.with_name("images.tar.part").exists()

    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("manifest.json"))
        layout = json.load(tar.extractfile("index.json"))
    assert {"manifest.json", "index.json", "oci-layout", f"blobs/sha256/{amd64.digest[7:]}"} <= names
    assert manifest[0] == {"Config": f"blobs/sha256/{amd64.config.digest[7:]}",
                           "RepoTags": ["exp/multi:v1"],
                           "Layers": [f"blobs/sha256/{d.digest[7:]}" for d in amd64.layers]}
    assert [m["digest"] for m in layout["manifests"]] == [amd64.digest, docker_img.digest]
    assert layout["manifests"][0]["annotations"] == {
        "io.containerd.image.name": "docker.io/exp/multi:v1", "org.opencontainers.image.ref.name": "v1"}

    # skopeo reads it both ways
    out = tmp_path / "from-docker-archive"
    await skopeo_copy(f"docker-archive:{tarball}:exp/docker:v2", f"oci:{out}")
    assert len(read_oci_layout_index(out)["manifests"]) == 1
    out = tmp_path / "from-oci-archive"
    await skopeo_copy(f"oci-archive:{tarball}:v1", f"oci:{out}", "--preserve-digests")
    assert [m["digest"] for m in read_oci_layout_index(out)["manifests"]] == [amd64.digest]

    # import into a fresh proxy: same digests
    fresh = await start_proxy(aiohttp_server, tmp_path / "fresh", reg)
    result = await import_archive(tarball, fresh, repo_prefix="team/", jobs=3)
    assert result.ok, result.failed
    assert sorted(result.images) == ["team/exp/docker:v2", "team/exp/multi:v1"]
    body, _, digest = await get_manifest(http_session, fresh, "team/exp/multi", "v1")
    assert (body, digest) == (amd64.manifest, amd64.digest)
    body, ctype, digest = await get_manifest(http_session, fresh, "team/exp/docker", "v2")
    assert (body, ctype, digest) == (docker_img.manifest, DOCKER_MANIFEST, docker_img.digest)
    pulled = tmp_path / "pulled"
    await skopeo_copy(f"docker://{fresh.removeprefix('http://')}/team/exp/docker:v2", f"oci:{pulled}",
                      "--preserve-digests")
    assert [m["digest"] for m in read_oci_layout_index(pulled)["manifests"]] == [docker_img.digest]

    again = await import_archive(tarball, fresh, repo_prefix="team/")
    assert again.ok and again.blobs == 0 and again.skipped == result.blobs + result.skipped


async def test_import_of_a_skopeo_docker_archive_and_an_oci_index_layout(
    aiohttp_server, upstream_registry, http_session, tmp_path
):
    reg = upstream_registry
    index = await push_multiarch(http_session, reg, "imp/multi", "v1", seed=440)
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", reg)
    host = proxy.removeprefix("http://")
    # docker-archive written by skopeo: <hex>.tar uncompressed layers, <hex>.json config
    archive = tmp_path / "skopeo.tar"
    await skopeo_copy(f"docker://{host}/imp/multi:v1", f"docker-archive:{archive}:imp/app:v3")
    result = await import_archive(archive, proxy, repo_prefix="team/")
    assert result.ok, result.failed
    assert result.images == ["team/imp/app:v3"]
    out = tmp_path / "pulled"
    await skopeo_copy(f"docker://{host}/team/imp/app:v3", f"oci:{out}")
    _, ctype, _ = await get_manifest(http_session, proxy, "team/imp/app", "v3")
    assert ctype == DOCKER_MANIFEST

    # a whole multi-arch OCI layout (skopeo --all) keeps the index digest
    layout = tmp_path / "layout"
    await skopeo_copy(f"docker://{host}/imp/multi:v1", f"oci:{layout}:v1", "--preserve-digests",
                      all_images=True)
    oci_tar = tmp_path / "layout.tar"
    tar_directory(layout, oci_tar)
    # a bare tag in ref.name and no manifest.json: no repository name
    result = await import_archive(oci_tar, proxy, repo_prefix="team/")
    assert not result.ok and "no image name" in result.failed[0][1]
    doc = json.loads((layout / "index.json").read_text())
    doc["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "imp/multi:v1"
    (layout / "index.json").write_text(json.dumps(doc))
    tar_directory(layout, oci_tar)
    result = await import_archive(oci_tar, proxy, repo_prefix="team/")
    assert result.ok, result.failed
    body, ctype, digest = await get_manifest(http_session, proxy, "team/imp/multi", "v1")
    assert (body, ctype, digest) == (index.manifest, OCI_INDEX, index.digest)

    # a partial index (docker save of one platform of a multi-arch image): the child present
    # is pushed in the index's place
    arm64 = index.images[1]
    (layout / "blobs" / "sha256" / arm64.digest[7:]).unlink()
    doc["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "imp/partial:v1"
    (layout / "index.json").write_text(json.dumps(doc))
    tar_directory(layout, oci_tar)
    result = await import_archive(oci_tar, proxy, repo_prefix="team/")
    assert result.ok and result.warnings, result.failed
    _, _, digest = await get_manifest(http_session, proxy, "team/imp/partial", "v1")
    assert digest == index.images[0].digest


async def test_the_cli_runs_export_and_import(aiohttp_server, upstream_registry, http_session,
                                              tmp_path, capsys):
    reg = upstream_registry
    img = await push_image(http_session, reg.url, "cli/app", "v1", [make_tar_layer(seed=500)],
                           schema="oci")
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", reg)
    tarball = tmp_path / "cli.tar"
    loop = asyncio.get_running_loop()
    # main() runs its own event loop: give it a thread, the proxy keeps serving in this one
    code = await loop.run_in_executor(None, main, ["export", "cli/app:v1", "-o", str(tarball),
                                                   "--proxy", proxy, "--no-progress"])
    assert code == 0 and "exported 1 image(s), 2 blob(s)" in capsys.readouterr().out
    code = await loop.run_in_executor(None, main, ["import", str(tarball), "--proxy", proxy,
                                                   "--repo-prefix", "team/", "--no-progress"])
    assert code == 0 and "pushed team/cli/app:v1" in capsys.readouterr().out
    _, _, digest = await get_manifest(http_session, proxy, "team/cli/app", "v1")
    assert digest == img.digest
    code = await loop.run_in_executor(None, main, ["export", "cli/nothing:v1", "-o", str(tarball),
                                                   "--proxy", proxy, "--no-progress"])
    assert code == 1 and "MANIFEST_UNKNOWN" in capsys.readouterr().err


def legacy_docker_save(path: Path, *repo_tags: str, corrupt: bool = False) -> list[str]:
    """A classic ``docker save`` tarball: <id>/layer.tar (uncompressed), <hex>.json config."""
    layers = [gzip.decompress(make_tar_layer(seed=s).data) for s in (460, 461)]
    diff_ids = [sha256_digest(layer) for layer in layers]
    config = build_config(("linux", "amd64"), diff_ids)
    config_hex = hashlib.sha256(config).hexdigest()
    entries = {f"{config_hex}.json": config}
    for i, layer in enumerate(layers):
        entries[f"layer{i}/layer.tar"] = layer[:-2000] + b"!" + layer[-1999:] if corrupt and i else layer
        entries[f"layer{i}/VERSION"] = b"1.0"
    entries["manifest.json"] = json.dumps([{"Config": f"{config_hex}.json", "RepoTags": list(repo_tags),
                                            "Layers": [f"layer{i}/layer.tar" for i in range(2)]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return diff_ids


async def test_import_of_a_classic_docker_save_verifies_every_layer(
    aiohttp_server, upstream_registry, http_session, tmp_path
):
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", upstream_registry)
    good = tmp_path / "good.tar"
    diff_ids = legacy_docker_save(good, "legacy/app:1.0", "docker.io/library/copy:2.0")
    result = await import_archive(good, proxy, repo_prefix="team/")
    assert result.ok, result.failed
    assert result.images == ["team/legacy/app:1.0", "team/copy:2.0"]
    assert (result.blobs, result.skipped) == (3, 3)  # the second repository mounts them
    body, ctype, _ = await get_manifest(http_session, proxy, "team/legacy/app", "1.0")
    doc = json.loads(body)
    assert ctype == DOCKER_MANIFEST
    assert [layer["digest"] for layer in doc["layers"]] == diff_ids
    assert {layer["mediaType"] for layer in doc["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar"}

    bad = tmp_path / "bad.tar"
    legacy_docker_save(bad, "legacy/bad:1.0", corrupt=True)
    result = await import_archive(bad, proxy, repo_prefix="team/")
    assert not result.ok and "does not match" not in result.failed[0][1]
    assert "content has digest" in result.failed[0][1]
    async with http_session.get(f"{proxy}/v2/team/legacy/bad/manifests/1.0") as resp:
        assert resp.status == 404

    gz = tmp_path / "archive.tar.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    with pytest.raises(ToolError, match="not an uncompressed tar"):
        await import_archive(gz, proxy)


@pytest.mark.e2e
async def test_docker_loads_the_export_and_its_save_imports_back(
    aiohttp_server, upstream_registry, http_session, tmp_path
):
    reg = upstream_registry
    img = await push_image(http_session, reg.url, "e2e/tool", "v1",
                           [make_tar_layer(seed=480), make_tar_layer(seed=481)], schema="docker",
                           platform=("linux", go_arch()))
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", reg)
    tarball = tmp_path / "export.tar"
    await export_images(["e2e/tool:v1"], tarball, proxy, platform=f"linux/{go_arch()}")
    saved = tmp_path / "saved.tar"
    with DockerDaemon(tmp_path / "d") as dockerd:
        res = await dockerd.adocker("load", "-i", str(tarball))
        assert res.returncode == 0, f"{res.stderr}\n{dockerd.log_tail()}"
        info = await dockerd.aimage_inspect("e2e/tool:v1")
        assert info["Id"] == img.config.digest
        res = await dockerd.adocker("save", "-o", str(saved), "e2e/tool:v1")
        assert res.returncode == 0, res.stderr
    result = await import_archive(saved, proxy, repo_prefix="team/")
    assert result.ok and result.images == ["team/e2e/tool:v1"], result.failed
    out = tmp_path / "pulled"
    await skopeo_copy(f"docker://{proxy.removeprefix('http://')}/team/e2e/tool:v1", f"oci:{out}")
    body, _, _ = await get_manifest(http_session, proxy, "team/e2e/tool", "v1")
    assert json.loads(body)["config"]["digest"] == img.config.digest  # docker kept the config


@pytest.mark.parametrize("mode", ["basic", "token"])
async def test_tools_log_in_to_a_proxy_with_authentication(aiohttp_server, upstream_registry, tmp_path,
                                                           mode):
    write_htpasswd(tmp_path / "htpasswd", {"bob": "bob-pw"})
    auth = parse_auth({"htpasswd": "htpasswd", "mode": mode, "rules": [
        {"users": ["bob"], "repositories": ["hosted/**"], "actions": ["pull", "push"]}]}, tmp_path)
    cfg = make_config(tmp_path / "data", {"upstream.test": upstream_registry.url},
                      hosted=("hosted/**",), auth=auth)
    server = await aiohttp_server(create_app(cfg))
    proxy = f"http://127.0.0.1:{server.port}"
    archive = tmp_path / "legacy.tar"
    legacy_docker_save(archive, "legacy/app:1.0")
    result = await import_archive(archive, proxy, repo_prefix="hosted/")
    assert not result.ok and "--username" in result.failed[0][1]
    result = await import_archive(archive, proxy, repo_prefix="hosted/", username="bob",
                                  password="bob-pw")
    assert result.ok and result.images == ["hosted/legacy/app:1.0"], result.failed
    report = await warm(["hosted/legacy/app:1.0"], proxy, username="bob", password="bob-pw")
    assert report.ok and report.blobs == 3, report.failed
    report = await warm(["hosted/legacy/app:1.0"], proxy, username="bob", password="wrong")
    assert not report.ok
