"""Hosted repositories: the upload protocol, manifest push/delete, referrers and GC."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from proxy.storage.backend import open_filesystem
from proxy.storage.gc import collect
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.images import make_tar_layer
from tests.support.proxyfix import make_config
from tests.support.skopeo import read_oci_layout_index, skopeo_copy
from tests.support.store import blob_path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = b"{}"


@pytest.fixture
async def registry(aiohttp_server, tmp_path):
    """(base URL, data dir, restart()) of a proxy with hosted ``team/*`` and a cached upstream."""
    fake = FakeUpstream()
    up = await aiohttp_server(fake.app())
    data = tmp_path / "data"

    async def start(**overrides) -> str:
        cfg = make_config(data, {"fake.io": str(up.make_url("")).rstrip("/")},
                          hosted=("team/*", "deep/**"), **overrides)
        server = await aiohttp_server(create_app(cfg))
        return str(server.make_url("")).rstrip("/")

    return await start(), data, start, fake


async def push_blob(client, base: str, repo: str, data: bytes) -> str:
    d = digest_of(data)
    async with client.post(f"{base}/v2/{repo}/blobs/uploads/?digest={d}", data=data) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Location"] == f"/v2/{repo}/blobs/{d}"
        assert r.headers["Docker-Content-Digest"] == d
    return d


def manifest_for(config: bytes, layers: list[bytes], **extra) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": digest_of(config), "size": len(config)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": digest_of(layer), "size": len(layer)} for layer in layers],
           **extra}
    return json.dumps(doc).encode()


async def push_image(client, base, repo, tag, layers, **extra) -> tuple[str, bytes]:
    config = json.dumps({"layers": len(layers), "extra": str(extra)}).encode()
    for blob in [config, *layers]:
        await push_blob(client, base, repo, blob)
    body = manifest_for(config, layers, **extra)
    async with client.put(f"{base}/v2/{repo}/manifests/{tag}", data=body,
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201, await r.text()
        return r.headers["Docker-Content-Digest"], body


async def test_chunked_upload_with_status_resume_and_out_of_order_chunk(registry, client):
    base, data, start, _ = registry
    blob = os.urandom(300_000)
    d = digest_of(blob)
    async with client.post(f"{base}/v2/team/app/blobs/uploads/") as r:
        assert r.status == 202
        loc, uid = r.headers["Location"], r.headers["Docker-Upload-UUID"]
        assert loc == f"/v2/team/app/blobs/uploads/{uid}" and r.headers["Range"] == "0-0"
    async with client.patch(base + loc, data=blob[:100_000],
                            headers={"Content-Range": "0-99999"}) as r:
        assert r.status == 202 and r.headers["Range"] == "0-99999"
    async with client.patch(base + loc, data=blob[:10], headers={"Content-Range": "0-9"}) as r:
        assert r.status == 416  # a repeated chunk is refused, the upload is untouched
        assert r.headers["Range"] == "0-99999"
    base2 = await start()  # a restart: the upload lives on disk
    async with client.get(base2 + loc) as r:
        assert r.status == 204 and r.headers["Range"] == "0-99999"
    async with client.patch(base2 + loc, data=blob[100_000:200_000],
                            headers={"Content-Range": "100000-199999"}) as r:
        assert r.status == 202
    async with client.put(f"{base2}{loc}?digest={digest_of(b'wrong')}", data=blob[200_000:]) as r:
        assert r.status == 400 and (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert not blob_path(data, d).exists()
    async with client.get(base2 + loc) as r:  # the failed PUT kept the bytes for a retry
        assert r.headers["Range"] == "0-299999"
    async with client.put(f"{base2}{loc}?digest={d}") as r:
        assert r.status == 201 and r.headers["Docker-Content-Digest"] == d
    async with client.get(f"{base2}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    async with client.get(base2 + loc) as r:
        assert r.status == 404 and (await r.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


async def test_cancel_and_purge_uploads(registry, client):
    base, data, start, _ = registry
    async with client.post(f"{base}/v2/team/app/blobs/uploads/") as r:
        loc = r.headers["Location"]
    async with client.delete(base + loc) as r:
        assert r.status == 204
    async with client.get(base + loc) as r:
        assert r.status == 404
    async with client.post(f"{base}/v2/team/app/blobs/uploads/") as r:
        uid = r.headers["Docker-Upload-UUID"]
    (data / "uploads" / uid / "started").write_text(str(time.time() - 3 * 86400))
    base2 = await start(upload_max_age=86400.0)  # abandoned uploads are purged at start
    for _ in range(100):
        if not (data / "uploads" / uid).exists():
            break
        await asyncio.sleep(0.02)
    assert not (data / "uploads" / uid).exists()
    async with client.get(f"{base2}/v2/team/app/blobs/uploads/{uid}") as r:
        assert r.status == 404


def test_purge_spares_an_upload_being_created(tmp_path):
    """Regression: ``create`` makes the directory, then ``data``, then ``started``; a purge
    running in between took the missing ``started`` for "abandoned in 1970" and removed
    the upload under the client (a 500 on the very next write)."""
    from proxy.storage import UploadStore

    _, staging = open_filesystem(tmp_path)
    uploads = UploadStore(staging)
    young = tmp_path / "uploads" / ("a" * 32)
    young.mkdir()  # the state right after create()'s mkdir
    writing = uploads.create("team/app")
    (writing.path / "started").write_text("")  # while create() writes it
    old = uploads.create("team/app")
    (old.path / "started").write_text(str(time.time() - 3 * 86400))
    assert uploads.purge(max_age=86400) == 1
    assert young.exists() and writing.path.exists() and not old.path.exists()


async def test_cross_repository_mount(registry, client):
    base, _, _, _ = registry
    d = await push_blob(client, base, "team/a", b"shared layer")
    async with client.post(f"{base}/v2/team/b/blobs/uploads/?mount={d}&from=team/a") as r:
        assert r.status == 201 and r.headers["Docker-Content-Digest"] == d
    async with client.get(f"{base}/v2/team/b/blobs/{d}") as r:
        assert await r.read() == b"shared layer"
    missing = digest_of(b"nowhere")
    async with client.post(f"{base}/v2/team/b/blobs/uploads/?mount={missing}&from=team/a") as r:
        assert r.status == 202 and "Docker-Upload-UUID" in r.headers  # fallback to an upload
    async with client.get(f"{base}/v2/team/c/blobs/{d}") as r:  # not linked to team/c
        assert r.status == 404


async def test_manifest_push_validation(registry, client):
    base, _data, _, _ = registry
    config, layer = b'{"a":1}', b"layer-bytes"
    body = manifest_for(config, [layer])
    async with client.put(f"{base}/v2/team/app/manifests/v1", data=body,
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 400
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    await push_blob(client, base, "team/app", config)
    await push_blob(client, base, "team/app", layer)
    wrong = "sha256:" + "0" * 64
    async with client.put(f"{base}/v2/team/app/manifests/{wrong}", data=body,
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 400 and (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"
    async with client.put(f"{base}/v2/team/app/manifests/v1", data=b"not json",
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    async with client.put(f"{base}/v2/team/app/manifests/v1", data=body,
                          headers={"Content-Type": OCI_INDEX}) as r:
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_INVALID"  # type mismatch
    async with client.put(f"{base}/v2/team/app/manifests/v1", data=b" " * (5 << 20)) as r:
        assert r.status == 413
    async with client.put(f"{base}/v2/team/app/manifests/.bad", data=body,
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 400 and (await r.json())["errors"][0]["code"] == "TAG_INVALID"
    async with client.put(f"{base}/v2/team/app/manifests/v1", data=body,
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201
        d = r.headers["Docker-Content-Digest"]
        assert d == digest_of(body) and r.headers["Location"] == f"/v2/team/app/manifests/{d}"
    for ref in ("v1", d):
        async with client.get(f"{base}/v2/team/app/manifests/{ref}") as r:
            assert await r.read() == body and r.headers["Content-Type"] == OCI_MANIFEST
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": d, "size": len(body)}]}).encode()
    async with client.put(f"{base}/v2/team/other/manifests/idx", data=index,
                          headers={"Content-Type": OCI_INDEX}) as r:
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    async with client.put(f"{base}/v2/team/app/manifests/idx", data=index,
                          headers={"Content-Type": OCI_INDEX}) as r:
        assert r.status == 201
    async with client.get(f"{base}/v2/team/app/tags/list") as r:
        assert await r.json() == {"name": "team/app", "tags": ["idx", "v1"]}


async def test_deletes_tags_manifests_blobs_and_the_disabled_switch(registry, client):
    base, _, start, _ = registry
    d, _ = await push_image(client, base, "team/app", "v1", [b"l1"])
    async with client.put(f"{base}/v2/team/app/manifests/v2",
                          data=(await (await client.get(f"{base}/v2/team/app/manifests/v1")).read()),
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201
    async with client.delete(f"{base}/v2/team/app/manifests/v1") as r:  # tag only
        assert r.status == 202
    async with client.get(f"{base}/v2/team/app/manifests/v1") as r:
        assert r.status == 404
    async with client.get(f"{base}/v2/team/app/manifests/{d}") as r:
        assert r.status == 200
    async with client.delete(f"{base}/v2/team/app/manifests/{d}") as r:
        assert r.status == 202
    for ref in (d, "v2"):
        async with client.get(f"{base}/v2/team/app/manifests/{ref}") as r:
            assert r.status == 404
    layer = digest_of(b"l1")
    async with client.delete(f"{base}/v2/team/app/blobs/{layer}") as r:
        assert r.status == 202
    async with client.get(f"{base}/v2/team/app/blobs/{layer}") as r:
        assert r.status == 404
    async with client.delete(f"{base}/v2/team/app/blobs/{layer}") as r:
        assert r.status == 404
    locked = await start(delete_enabled=False)
    async with client.delete(f"{locked}/v2/team/app/manifests/{d}") as r:
        assert r.status == 405 and (await r.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_referrers_with_artifact_type_filter(registry, client):
    base, _, _, _ = registry
    subject, body = await push_image(client, base, "team/app", "v1", [b"app"])
    await push_blob(client, base, "team/app", EMPTY)
    empty = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(EMPTY),
             "size": 2}
    referrers = {}
    for art in ("application/vnd.example.sbom", "application/vnd.example.sig"):
        doc = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": art,
                          "config": empty, "layers": [empty],
                          "subject": {"mediaType": OCI_MANIFEST, "digest": subject,
                                      "size": len(body)},
                          "annotations": {"kind": art}}).encode()
        async with client.put(f"{base}/v2/team/app/manifests/{digest_of(doc)}", data=doc,
                              headers={"Content-Type": OCI_MANIFEST}) as r:
            assert r.status == 201 and r.headers["OCI-Subject"] == subject
        referrers[art] = digest_of(doc)
    async with client.get(f"{base}/v2/team/app/referrers/{subject}") as r:
        assert r.status == 200 and r.headers["Content-Type"] == OCI_INDEX
        index = await r.json()
        assert sorted(m["digest"] for m in index["manifests"]) == sorted(referrers.values())
        assert {m["artifactType"] for m in index["manifests"]} == set(referrers)
    sbom = "application/vnd.example.sbom"
    async with client.get(f"{base}/v2/team/app/referrers/{subject}?artifactType={sbom}") as r:
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        assert [m["digest"] for m in (await r.json())["manifests"]] == [referrers[sbom]]
    async with client.get(f"{base}/v2/team/app/referrers/{digest_of(b'none')}") as r:
        assert r.status == 200 and (await r.json())["manifests"] == []


async def test_catalog_lists_hosted_and_cached_and_deep_names(registry, client):
    base, _, _, fake = registry
    fake.add_image("cached/img", "1", [b"c"])
    await push_image(client, base, "team/app", "v1", [b"x"])
    await push_image(client, base, "deep/a/b/c", "v1", [b"y"])
    async with client.get(f"{base}/v2/cached/img/manifests/1") as r:
        assert r.status == 200
    async with client.get(f"{base}/v2/_catalog") as r:
        assert (await r.json())["repositories"] == ["cached/img", "deep/a/b/c", "team/app"]


async def test_gc_sweeps_unreferenced_content_and_respects_grace(registry, client):
    base, data, _, _ = registry
    keep, _ = await push_image(client, base, "team/app", "keep", [b"kept-layer"])
    gone, _ = await push_image(client, base, "team/app", "gone", [b"dropped-layer"])
    async with client.delete(f"{base}/v2/team/app/manifests/gone") as r:
        assert r.status == 202
    orphan = await push_blob(client, base, "team/app", b"orphan blob")
    store, _ = open_filesystem(data, clean=False)
    young = await collect(store, dry_run=True, grace=3600)
    assert young.blobs == []  # everything is younger than the grace period
    dry = await collect(store, dry_run=True, grace=0)
    assert digest_of(b"orphan blob") in {str(d) for d, _ in dry.blobs}
    assert blob_path(data, orphan).exists()  # dry run
    assert (await collect(store, grace=0)).blobs == dry.blobs  # untagged manifest kept: its blobs too
    assert await store.get_manifest(await store.get_tag("team/app", "keep")) is not None
    removed = {str(d) for d, _ in (await collect(store, grace=0, delete_untagged=True)).blobs}
    assert gone in removed and digest_of(b"dropped-layer") in removed
    assert keep not in removed and digest_of(b"kept-layer") not in removed
    async with client.get(f"{base}/v2/team/app/manifests/keep") as r:
        assert r.status == 200
    async with client.get(f"{base}/v2/team/app/blobs/{digest_of(b'kept-layer')}") as r:
        assert await r.read() == b"kept-layer"


async def test_gc_command_line(registry, client, tmp_path):
    import subprocess
    import sys

    base, data, _, _ = registry
    await push_blob(client, base, "team/app", b"unreferenced")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "gc", "--data-dir", str(data), "--grace", "0", "--dry-run",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert f"would delete blob {digest_of(b'unreferenced')} (12 B)" in out.decode()
    assert "would delete 1 blobs, 12 B" in out.decode()


async def test_skopeo_pushes_to_a_hosted_repository_and_pulls_back(registry, tmp_path: Path):
    base, _, _, _ = registry
    host = base.removeprefix("http://")
    src = tmp_path / "src"
    layer = make_tar_layer(seed=3)
    # Build a source image with skopeo itself: copy from our proxy after a raw push.
    async with aiohttp.ClientSession() as client:
        d, _ = await push_image(client, base, "team/seed", "v1", [layer.data])
    await skopeo_copy(f"docker://{host}/team/seed:v1", f"oci:{src}:v1", "--preserve-digests")
    await skopeo_copy(f"oci:{src}:v1", f"docker://{host}/team/pushed:v1", "--preserve-digests")
    out = tmp_path / "out"
    await skopeo_copy(f"docker://{host}/team/pushed:v1", f"oci:{out}", "--preserve-digests")
    assert [m["digest"] for m in read_oci_layout_index(out)["manifests"]] == [d]
