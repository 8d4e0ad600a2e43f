"""Self-test of the test harness against a real docker-registry and skopeo."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.support import images
from tests.support.images import (
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    blob_exists,
    get_manifest,
    make_layer_file,
    make_tar_layer,
    push_blob,
    push_image,
    push_index,
)
from tests.support.registry import RegistryProcess
from tests.support.skopeo import SkopeoError, read_oci_layout_index, skopeo_copy, skopeo_inspect

MiB = 1 << 20


async def test_docker_image_roundtrip_with_skopeo(
    upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    reg = upstream_registry
    layers = [make_tar_layer(seed=1), make_tar_layer({"bin/tool": b"#!/bin/true\n"}, seed=2)]
    img = await push_image(http_session, reg.url, "harness/docker", "v1", layers, schema="docker")
    assert img.media_type == DOCKER_MANIFEST
    assert [layer.media_type for layer in img.layers] == [DOCKER_LAYER_GZIP] * 2
    config = json.loads(img.config_bytes)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in layers]

    body, ctype, digest = await get_manifest(http_session, reg.url, "harness/docker", "v1")
    assert (body, ctype, digest) == (img.manifest, DOCKER_MANIFEST, img.digest)

    raw = await skopeo_inspect(f"docker://{reg.host}/harness/docker:v1", True)
    assert raw == img.manifest
    info = await skopeo_inspect(f"docker://{reg.host}/harness/docker:v1")
    assert info["Digest"] == img.digest

    out = tmp_path / "oci-docker"
    await skopeo_copy(
        f"docker://{reg.host}/harness/docker:v1", f"oci:{out}:v1", "--preserve-digests"
    )
    index = read_oci_layout_index(out)
    assert [m["digest"] for m in index["manifests"]] == [img.digest]
    for layer in img.layers:
        assert (out / "blobs" / "sha256" / layer.digest.split(":", 1)[1]).stat().st_size == layer.size


async def test_multiarch_oci_index_roundtrip_with_skopeo(
    upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    reg = upstream_registry
    repo = "harness/multi"
    children = [
        await push_image(
            http_session, reg.url, repo, None, [make_tar_layer(seed=10 + i)], schema="oci", platform=plat
        )
        for i, plat in enumerate([("linux", "amd64"), ("linux", "arm64", "v8")])
    ]
    idx = await push_index(http_session, reg.url, repo, "latest", children, schema="oci")
    assert idx.media_type == OCI_INDEX
    assert all(c.media_type == OCI_MANIFEST for c in children)

    # Without --all skopeo picks the linux/amd64 child (--override-arch amd64).
    single = tmp_path / "single"
    await skopeo_copy(f"docker://{reg.host}/{repo}:latest", f"oci:{single}", "--preserve-digests")
    assert [m["digest"] for m in read_oci_layout_index(single)["manifests"]] == [children[0].digest]

    everything = tmp_path / "all"
    await skopeo_copy(
        f"docker://{reg.host}/{repo}:latest", f"oci:{everything}", "--preserve-digests", all_images=True
    )
    assert [m["digest"] for m in read_oci_layout_index(everything)["manifests"]] == [idx.digest]
    copied = json.loads((everything / "blobs" / "sha256" / idx.digest.split(":", 1)[1]).read_bytes())
    assert [m["digest"] for m in copied["manifests"]] == [c.digest for c in children]
    assert copied["manifests"][1]["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}

    # A Docker manifest list over Docker children works too.
    dchildren = [
        await push_image(http_session, reg.url, repo, None, [make_tar_layer(seed=20)], platform=plat)
        for plat in [("linux", "amd64"), ("linux", "arm", "v7")]
    ]
    dlist = await push_index(http_session, reg.url, repo, "dlist", dchildren, schema="docker")
    assert await skopeo_inspect(f"docker://{reg.host}/{repo}:dlist", True) == dlist.manifest


async def test_large_streamed_blob_and_chunked_upload(
    upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession, tmp_layer_dir: Path
) -> None:
    reg = upstream_registry
    path = tmp_layer_dir / "big.bin"
    digest, size = make_layer_file(path, 64 * MiB, seed=42)
    assert size == path.stat().st_size == 64 * MiB
    assert make_layer_file(tmp_layer_dir / "again.bin", 64 * MiB, seed=42)[0] == digest

    desc = await push_blob(http_session, reg.url, "harness/big", path)
    assert desc.digest == digest
    async with http_session.head(f"{reg.url}/v2/harness/big/blobs/{digest}") as resp:
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) == 64 * MiB
        assert resp.headers["Docker-Content-Digest"] == digest

    small = tmp_layer_dir / "small.bin"
    sdigest, _ = make_layer_file(small, 5 * MiB + 123, seed=7)
    await push_blob(http_session, reg.url, "harness/big", small, chunk_size=2 * MiB)
    assert await blob_exists(http_session, reg.url, "harness/big", sdigest) == 5 * MiB + 123

    # A random (non-tar) layer is fine for skopeo.
    img = await push_image(http_session, reg.url, "harness/big", "random", [small], schema="oci")
    assert img.layers[0].media_type == images.OCI_LAYER_TAR
    assert json.loads(img.config_bytes)["rootfs"]["diff_ids"] == [sdigest]


async def test_stop_and_restart_keeps_port_and_content(
    fresh_registry: RegistryProcess, http_session: aiohttp.ClientSession
) -> None:
    reg = fresh_registry
    img = await push_image(http_session, reg.url, "harness/restart", "v1", [make_tar_layer(seed=3)])
    port = reg.port
    reg.stop()
    assert not reg.running
    try:
        await skopeo_inspect(f"docker://{reg.host}/harness/restart:v1", True, timeout=30)
    except SkopeoError as exc:
        assert exc.returncode != 0 and exc.stderr
    else:
        raise AssertionError("skopeo inspect should fail while the registry is down")
    reg.start()
    assert reg.port == port
    body, _, digest = await get_manifest(http_session, reg.url, "harness/restart", "v1")
    assert (body, digest) == (img.manifest, img.digest)
