"""End to end on the S3 backend: the proxy (in-process, ``create_app``) keeps its objects in
the session's SeaweedFS bucket, each test under its own key prefix, and skopeo pulls and
pushes through it.

Every check looks at the bucket itself (through a store of the same settings,
as ``regproxy gc`` would open it) or compares bytes with what was pushed upstream. The
local storage root only holds temp files with S3, so the tests also check that it ends up
without any object and with an empty ``tmp/``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import S3Config
from proxy.reference import Digest
from proxy.settings.prefetch import PrefetchConfig
from proxy.storage import RegistryStore
from proxy.storage.backend import open_s3
from proxy.storage.driver.s3 import MiB, S3Driver
from proxy.storage.gc import collect
from proxy.storage.registry import blob_key
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import (
    OCI_MANIFEST,
    PushedImage,
    file_digest,
    make_layer_file,
    make_tar_layer,
    push_image,
)
from tests.support.proxyfix import make_config
from tests.support.registry import RegistryProcess
from tests.support.seaweed import SeaweedFS, ensure_bucket, list_keys, list_multipart_uploads
from tests.support.skopeo import read_oci_layout_index, skopeo_copy
from tests.support.store import tmp_files

pytestmark = pytest.mark.timeout(120)
#: for raw requests: a short body must fail the test quickly, not hang it until the timeout
FAST = aiohttp.ClientTimeout(total=20)


# -- fixtures and helpers ------------------------------------------------------------------


@dataclass
class Bucket:
    """The test's slice of the bucket: its settings and a store to look into it."""

    config: S3Config
    store: RegistryStore[S3Driver]

    @property
    def prefix(self) -> str:
        return self.config.key("")

    def blob_key(self, digest: str) -> str:
        return self.config.key(blob_key(Digest.parse(digest)))

    def media_type_key(self, digest: str) -> str:
        d = Digest.parse(digest)
        return self.config.key(f"manifests/{d.algorithm}/{d.hex[:2]}/{d.hex}")

    async def keys(self, under: str = "") -> list[str]:
        return await list_keys(self.store.driver.client, self.config.key(under))

    async def multipart_uploads(self) -> list[str]:
        return await list_multipart_uploads(self.store.driver.client, self.prefix)

    async def read(self, key: str) -> bytes:
        resp = await self.store.driver.client.get_object(Bucket=self.config.bucket, Key=key)
        async with resp["Body"] as body:
            return bytes(await body.read())

    async def size(self, key: str) -> int | None:
        try:
            head = await self.store.driver.client.head_object(Bucket=self.config.bucket, Key=key)
        except Exception:
            return None
        return int(head["ContentLength"])


@pytest.fixture
async def bucket(seaweedfs: SeaweedFS) -> AsyncIterator[Bucket]:
    """A fresh prefix (part size 8 MiB, the default) and a store on it for inspection."""
    config = seaweedfs.s3_config(part_size=8 * MiB)
    async with open_s3(config) as store:
        await ensure_bucket(store.driver.client)
        yield Bucket(config, store)


@dataclass
class Proxy:
    base: str  #: http://127.0.0.1:port
    host: str  #: 127.0.0.1:port, for image references
    root: Path  #: the local storage root (temp files only)
    responses: list[tuple[str, str, int]]  #: (method, path, status) of every answer

    def blob_answers(self, status: int) -> set[str]:
        """Digests of blob GETs answered with ``status``."""
        return {path.rsplit("/", 1)[1] for method, path, st in self.responses
                if method == "GET" and "/blobs/sha256:" in path and st == status}


NO_PREFETCH = PrefetchConfig(enabled=False)


async def start_proxy(aiohttp_server, root: Path, upstreams: dict[str, str], s3: S3Config,
                      **overrides: object) -> Proxy:
    app = create_app(make_config(root, upstreams, s3=s3, **overrides))
    responses: list[tuple[str, str, int]] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        responses.append((request.method, request.path, response.status))

    app.on_response_prepare.append(record)
    server = await aiohttp_server(app)
    return Proxy(f"http://127.0.0.1:{server.port}", f"127.0.0.1:{server.port}", root, responses)


async def eventually(check: Callable[[], Awaitable[bool]], wait: float = 15.0) -> bool:
    """Poll ``check`` until it holds: a client has a blob's last byte once its digest is
    verified; publishing the object in S3 (complete + copy) follows right after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not await check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


#: Where the filesystem backend keeps objects, metadata, uploads and temp files; with S3
#: they must all stay empty locally (lock files sit in ``locks/``).
LOCAL_CONTENT = ("blobs", "manifests", "repositories", "uploads", "tmp")


def local_files(root: Path) -> list[str]:
    """Every file in the content directories of a local storage root (relative paths)."""
    return sorted(str(p.relative_to(root)) for sub in LOCAL_CONTENT
                  for p in (root / sub).rglob("*") if p.is_file())


def image_blobs(img: PushedImage) -> list[str]:
    """Digests of the manifest, config and layers of an image."""
    return [img.digest, img.config.digest, *(layer.digest for layer in img.layers)]


async def assert_image_in_bucket(bucket: Bucket, img: PushedImage) -> None:
    """Every object of ``img`` is in the bucket with the right size, the manifest's media
    type is recorded, and nothing is left of the uploads that put them there."""
    wanted = {bucket.blob_key(d) for d in image_blobs(img)}

    async def published() -> bool:
        return wanted <= set(await bucket.keys("blobs/"))

    assert await eventually(published), sorted(wanted - set(await bucket.keys("blobs/")))
    for layer in img.layers:
        assert await bucket.size(bucket.blob_key(layer.digest)) == layer.size
    assert await bucket.read(bucket.blob_key(img.digest)) == img.manifest
    assert await bucket.read(bucket.blob_key(img.config.digest)) == img.config_bytes
    assert (await bucket.read(bucket.media_type_key(img.digest))).decode() == img.media_type

    async def no_uploads() -> bool:
        return not await bucket.keys("_uploads/") and not await bucket.multipart_uploads()

    assert await eventually(no_uploads), (await bucket.keys("_uploads/"),
                                          await bucket.multipart_uploads())


def assert_copied(out: Path, img: PushedImage) -> None:
    """An ``oci:`` layout copied with --preserve-digests holds exactly ``img``."""
    assert [m["digest"] for m in read_oci_layout_index(out)["manifests"]] == [img.digest]
    for blob in image_blobs(img):
        path = out / "blobs" / "sha256" / blob[7:]
        assert file_digest(path)[0] == blob


# -- a. cold pull: every object goes to S3, nothing stays local ------------------------------


async def test_cold_pull_stores_every_object_in_the_bucket(
    aiohttp_server, upstream_registry: RegistryProcess, http_session, tmp_path, bucket
):
    reg = upstream_registry
    big = tmp_path / "big-layer"
    make_layer_file(big, 21 * MiB + 12345, seed=71)  # three 8 MiB parts: a multipart upload
    img = await push_image(http_session, reg.url, "s3/cold", "v1",
                           [big, make_tar_layer(seed=72), make_tar_layer(seed=73)], schema="oci")
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", {"upstream.test": reg.url},
                              bucket.config)

    out = tmp_path / "out"
    await skopeo_copy(f"docker://{proxy.host}/s3/cold:v1", f"oci:{out}", "--preserve-digests")
    assert_copied(out, img)
    assert (out / "blobs" / "sha256" / img.layers[0].digest[7:]).read_bytes() == big.read_bytes()

    await assert_image_in_bucket(bucket, img)
    assert await bucket.read(bucket.config.key("repositories/upstream.test/s3/cold/_tags/v1")) == \
        img.digest.encode()
    assert bucket.config.key(f"repositories/upstream.test/s3/cold/_manifests/sha256/{img.digest[7:]}") in \
        await bucket.keys("repositories/")
    # nothing lives outside the test's prefix of the bucket... and nothing locally
    assert all(k.startswith(bucket.prefix) for k in await bucket.keys())
    assert local_files(proxy.root) == []
    assert tmp_files(proxy.root) == []


# -- b. warm pull with the upstream down: served from S3 -----------------------------------


async def test_warm_pull_is_served_from_the_bucket_with_the_upstream_down(
    aiohttp_server, fresh_registry: RegistryProcess, http_session, tmp_path, bucket
):
    reg = fresh_registry
    layer = tmp_path / "layer"
    make_layer_file(layer, 12 * MiB + 7, seed=81)
    data = layer.read_bytes()
    img = await push_image(http_session, reg.url, "s3/warm", "v1", [layer, make_tar_layer(seed=82)],
                           schema="oci")
    first = await start_proxy(aiohttp_server, tmp_path / "a", {"upstream.test": reg.url},
                              bucket.config)
    await skopeo_copy(f"docker://{first.host}/s3/warm:v1", f"oci:{tmp_path / 'a-out'}")
    await assert_image_in_bucket(bucket, img)

    reg.stop()
    assert not reg.running
    # a second replica: a fresh local root, only the bucket in common
    second = await start_proxy(aiohttp_server, tmp_path / "b", {"upstream.test": reg.url},
                               bucket.config)
    out = tmp_path / "b-out"
    await skopeo_copy(f"docker://{second.host}/s3/warm:v1", f"oci:{out}", "--preserve-digests")
    assert_copied(out, img)
    assert second.blob_answers(200) == {img.config.digest, *(x.digest for x in img.layers)}

    digest = img.layers[0].digest
    url = f"{second.base}/v2/s3/warm/blobs/{digest}"
    async with http_session.get(url, timeout=FAST) as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.content_length == len(data)
        assert await r.read() == data
    async with http_session.head(url) as r:
        assert r.status == 200 and r.content_length == len(data)
    # ranges: across the 8 MiB part boundary, one byte, and an open-ended tail
    for header, start, end in [(f"bytes={8 * MiB - 100}-{9 * MiB}", 8 * MiB - 100, 9 * MiB),
                               ("bytes=0-0", 0, 0),
                               (f"bytes={len(data) - 1000}-", len(data) - 1000, len(data) - 1)]:
        async with http_session.get(url, headers={"Range": header}, timeout=FAST) as r:
            assert r.status == 206, header
            assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
            assert await r.read() == data[start:end + 1]
    async with http_session.get(url, headers={"Range": f"bytes={len(data) + 10}-"}) as r:
        assert r.status == 416
    async with http_session.get(f"{second.base}/v2/s3/warm/manifests/v1",
                                headers={"Accept": OCI_MANIFEST}, timeout=FAST) as r:
        assert r.status == 200 and await r.read() == img.manifest
    # served from S3 without landing on the replica's disk
    assert local_files(second.root) == []
    assert tmp_files(second.root) == []


# -- c. redirects to presigned URLs ---------------------------------------------------------


async def test_redirect_mode_sends_clients_to_presigned_urls(
    aiohttp_server, upstream_registry: RegistryProcess, http_session, tmp_path, bucket,
    seaweedfs: SeaweedFS
):
    reg = upstream_registry
    layer = tmp_path / "layer"
    make_layer_file(layer, 3 * MiB + 5, seed=91)
    data = layer.read_bytes()
    img = await push_image(http_session, reg.url, "s3/redirect", "v1",
                           [layer, make_tar_layer(seed=92)], schema="oci")
    config = replace(bucket.config, redirect=True)
    # no layer prefetch: a blob it stored before the client's GET would be redirected, and
    # this checks that a fill still streams through the proxy
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", {"upstream.test": reg.url}, config,
                              prefetch=NO_PREFETCH)

    # cold: the fill streams through the proxy (there is nothing to redirect to yet)
    await skopeo_copy(f"docker://{proxy.host}/s3/redirect:v1", f"oci:{tmp_path / 'cold'}")
    await assert_image_in_bucket(bucket, img)
    assert proxy.blob_answers(307) == set()

    digest = img.layers[0].digest
    async with http_session.get(f"{proxy.base}/v2/s3/redirect/blobs/{digest}",
                                allow_redirects=False) as r:
        assert r.status == 307
        assert r.headers["Docker-Content-Digest"] == digest
        location = r.headers["Location"]
    assert location.startswith(f"{seaweedfs.endpoint}/{config.bucket}/{bucket.blob_key(digest)}?")
    assert "X-Amz-Signature=" in location
    async with aiohttp.ClientSession(timeout=FAST) as anonymous:  # no credentials at all
        async with anonymous.get(location) as r:
            assert r.status == 200 and await r.read() == data
        async with anonymous.get(location, headers={"Range": "bytes=100-199"}) as r:
            assert r.status == 206 and await r.read() == data[100:200]
    async with http_session.head(f"{proxy.base}/v2/s3/redirect/blobs/{digest}",
                                 allow_redirects=False) as r:
        assert r.status == 200 and r.content_length == len(data)  # HEAD needs no bytes

    # warm: skopeo follows every blob redirect to the object store
    proxy.responses.clear()
    out = tmp_path / "warm"
    await skopeo_copy(f"docker://{proxy.host}/s3/redirect:v1", f"oci:{out}", "--preserve-digests")
    assert_copied(out, img)
    assert proxy.blob_answers(307) == {img.config.digest, *(x.digest for x in img.layers)}
    assert proxy.blob_answers(200) == set()


# -- d. hosted repositories on S3, then GC ---------------------------------------------------


async def test_hosted_push_pull_delete_and_gc_on_the_bucket(
    aiohttp_server, upstream_registry: RegistryProcess, http_session, tmp_path, bucket
):
    reg = upstream_registry
    big = tmp_path / "big"
    make_layer_file(big, 9 * MiB, seed=101)  # published from the local upload: multipart
    shared = make_tar_layer(seed=102)
    one = await push_image(http_session, reg.url, "s3src/app", "1",
                           [shared, big, make_tar_layer(seed=103)], schema="docker")
    two = await push_image(http_session, reg.url, "s3src/app", "2",
                           [shared, make_tar_layer(seed=104)], schema="docker")
    proxy = await start_proxy(aiohttp_server, tmp_path / "data", {"upstream.test": reg.url},
                              bucket.config, hosted=("team/*",))

    for img in (one, two):  # straight from the upstream registry into the hosted repository
        await skopeo_copy(f"docker://{reg.host}/s3src/app:{img.tag}",
                          f"docker://{proxy.host}/team/app:{img.tag}", "--preserve-digests")
    for img in (one, two):
        await assert_image_in_bucket(bucket, img)
        assert await bucket.read(bucket.config.key(f"repositories/team/app/_tags/{img.tag}")) \
            == img.digest.encode()
    assert local_files(proxy.root) == []  # uploads were published to S3 and removed
    assert tmp_files(proxy.root) == []

    out = tmp_path / "out"
    await skopeo_copy(f"docker://{proxy.host}/team/app:1", f"oci:{out}", "--preserve-digests")
    assert_copied(out, one)
    async with http_session.get(f"{proxy.base}/v2/team/app/tags/list") as r:
        assert r.status == 200
        assert await r.json() == {"name": "team/app", "tags": ["1", "2"]}

    async with http_session.delete(f"{proxy.base}/v2/team/app/manifests/{two.digest}") as r:
        assert r.status == 202
    async with http_session.get(f"{proxy.base}/v2/team/app/tags/list") as r:
        assert (await r.json())["tags"] == ["1"]
    async with http_session.get(f"{proxy.base}/v2/team/app/manifests/{two.digest}") as r:
        assert r.status == 404

    # GC over the bucket, with a store of its own (as ``regproxy gc`` opens it)
    async with open_s3(bucket.config) as store:
        report = await collect(store, grace=0)
    only_two = {two.digest, two.config.digest, two.layers[1].digest}
    assert {str(d) for d, _ in report.blobs} == only_two
    assert report.untagged == []
    keys = set(await bucket.keys())
    for d in only_two:
        assert bucket.blob_key(d) not in keys
    assert bucket.media_type_key(two.digest) not in keys
    for d in image_blobs(one):  # the shared layer included
        assert bucket.blob_key(d) in keys
    assert bucket.media_type_key(one.digest) in keys
    # what GC kept is still whole
    again = tmp_path / "again"
    await skopeo_copy(f"docker://{proxy.host}/team/app:1", f"oci:{again}", "--preserve-digests")
    assert_copied(again, one)


# -- e. a lying upstream leaves nothing in the bucket ----------------------------------------


async def test_a_fill_with_a_bad_digest_leaves_nothing_in_the_bucket(
    aiohttp_server, tmp_path, bucket
):
    fake = FakeUpstream()
    up = await aiohttp_server(fake.app())
    config = replace(bucket.config, part_size=5 * MiB)
    proxy = await start_proxy(aiohttp_server, tmp_path / "data",
                              {"fake.io": str(up.make_url("")).rstrip("/")}, config)
    blob = os.urandom(12 * MiB)  # three parts of 5 MiB: a multipart upload is under way
    digest = fake.add_blob(blob)
    fake.corrupt = True  # the first byte is flipped: the digest will not match
    fake.chunk_delay = 0.001
    url = f"{proxy.base}/v2/app/blobs/{digest}"

    async with aiohttp.ClientSession(auto_decompress=False, timeout=FAST) as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(url) as r:
                assert r.status == 200
                await r.content.readexactly(10 * MiB)
                fake.chunk_delay = 0.04  # the last 2 MiB take >1 s: look at the bucket meanwhile
                # the first part is in S3 (the second on its way), under a temp key only
                uploads = await bucket.multipart_uploads()
                assert len(uploads) == 1 and uploads[0].startswith(bucket.config.key("_uploads/"))
                assert await bucket.keys("blobs/") == []
                await r.read()  # the proxy cuts the connection: the digest did not match

        async def cleaned_up() -> bool:
            return not await bucket.multipart_uploads() and not await bucket.keys("_uploads/")

        assert await eventually(cleaned_up), await bucket.multipart_uploads()
        assert await bucket.keys("blobs/") == []
        assert await bucket.size(bucket.blob_key(digest)) is None
        assert tmp_files(proxy.root) == []

        # the same fill with honest bytes does reach the bucket (so the above is no accident)
        fake.corrupt, fake.chunk_delay = False, 0.0
        async with client.get(url) as r:
            assert r.status == 200 and await r.read() == blob

        async def stored() -> bool:
            return await bucket.size(bucket.blob_key(digest)) == len(blob)

        assert await eventually(stored)
        assert await bucket.keys("blobs/") == [bucket.blob_key(digest)]
        assert await eventually(cleaned_up)
    assert fake.count("GET", f"/blobs/{digest}") == 2
    assert local_files(proxy.root) == []


# -- configuration ---------------------------------------------------------------------------


async def test_storage_s3_settings_open_a_store_on_the_bucket(seaweedfs: SeaweedFS, tmp_path,
                                                              bucket):
    """``[storage] backend = "s3"`` + ``[storage.s3]`` (as from TOML) through ``open_store``:
    objects go to the bucket under the prefix, ``storage.root`` only gets the scratch layout."""
    from proxy.config import from_dict
    from proxy.storage.backend import open_store

    cfg = from_dict({"storage": {"root": str(tmp_path / "scratch"), "backend": "s3", "s3": {
        "bucket": bucket.config.bucket, "endpoint": seaweedfs.endpoint, "region": "us-east-1",
        "prefix": bucket.prefix, "access_key": bucket.config.access_key,
        "secret_key": bucket.config.secret_key, "part_size": "6MiB", "redirect": True}}})
    assert cfg.s3 is not None and cfg.s3.part_size == 6 * MiB and cfg.s3.redirect
    data = os.urandom(7 * MiB)
    d = Digest.of(data)
    (tmp_path / "blob").write_bytes(data)
    async with open_store(cfg) as (store, staging):
        assert isinstance(store, RegistryStore) and isinstance(store.driver, S3Driver)
        assert staging.root == tmp_path / "scratch"
        await store.import_file(tmp_path / "blob", d, len(data))
        assert await store.blob_size(d) == len(data)
        assert (await store.redirect_url(d) or "").startswith(seaweedfs.endpoint)
    assert await bucket.keys() == [bucket.blob_key(str(d))]
    assert await bucket.multipart_uploads() == []
    assert local_files(tmp_path / "scratch") == []


async def test_eviction_on_the_bucket_drops_the_least_recently_used_image(
        aiohttp_server, seaweedfs: SeaweedFS, tmp_path):
    """LRU on S3: an object's last use is the newest of its LastModified and of its
    ``access/`` marker (hits write one), so a re-used old image outlives a newer one."""
    from proxy.storage.eviction import evict

    fake = FakeUpstream()
    layers = {name: [os.urandom(2 * MiB), os.urandom(1 * MiB)] for name in ("a", "b")}
    for name, data in layers.items():
        fake.add_image(f"team/{name}", "v1", data)
    up = await aiohttp_server(fake.app())
    s3 = seaweedfs.s3_config()
    # no layer prefetch: a client's GET right after a prefetch is a hit that marks the blob
    # used, and the proxy marks a blob at most once every 30 s, so the last pull of 'a' would
    # not count (the test's pulls are 1.5 s apart)
    proxy = await aiohttp_server(create_app(make_config(
        tmp_path / "d", {"fake.io": f"http://127.0.0.1:{up.port}"}, s3=s3, prefetch=NO_PREFETCH)))
    base = f"http://127.0.0.1:{proxy.port}"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with aiohttp.ClientSession() as s:
        async def pull(name: str) -> None:
            async with s.get(f"{base}/v2/team/{name}/manifests/v1", headers=accept) as r:
                assert r.status == 200
                doc = await r.json()
            for desc in [doc["config"], *doc["layers"]]:
                async with s.get(f"{base}/v2/team/{name}/blobs/{desc['digest']}") as r:
                    assert r.status == 200 and len(await r.read()) == desc["size"]

        await pull("a")
        await asyncio.sleep(1.5)  # S3 times have a 1 s resolution
        await pull("b")
        await asyncio.sleep(1.5)
        await pull("a")  # hits: 'a' is the most recently used now (access markers)
        await asyncio.sleep(0.5)  # the markers are written in the background
    async with open_s3(s3) as store:
        dry = await evict(store, max_size=4 * MiB, max_age=0, is_hosted=lambda _: False,
                          dry_run=True)
        b_digests = {str(Digest.of(d)) for d in layers["b"]}
        evicted = {str(d) for d, _ in dry.evicted}
        assert b_digests <= evicted, "b's layers go first"
        assert not {str(Digest.of(d)) for d in layers["a"]} & evicted, "a was used last"
        report = await evict(store, max_size=4 * MiB, max_age=0, is_hosted=lambda _: False)
        assert {str(d) for d, _ in report.evicted} == evicted
        for d in layers["b"]:
            assert await store.blob_size(Digest.of(d)) is None
        for d in layers["a"]:
            assert await store.blob_size(Digest.of(d)) == len(d)
