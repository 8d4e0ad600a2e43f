"""Single flight across worker processes: the in-progress fill file is the rendezvous."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess

import aiohttp
import pytest

from proxy.app import create_app
from proxy.reference import Digest
from proxy.storage import BlobWriter
from proxy.storage.backend import open_filesystem
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import make_layer_file, push_image
from tests.support.proxyfix import make_config
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import upstream_gets
from tests.support.store import blob_path, is_stored, wait_stored, wait_tmp_empty

MiB = 1 << 20


def test_claim_fill_is_exclusive_and_takes_over_abandoned_fills(tmp_path):
    _, store = open_filesystem(tmp_path)
    d = Digest.of(b"x")
    first = store.claim_fill(d)
    assert first is not None
    assert store.claim_fill(d) is None  # a live filler holds the lock
    fd = store.open_fill(d)
    assert fd is not None and store.filler_alive(fd)
    first.abort()
    assert not store.filler_alive(fd)
    os.close(fd)
    # a fill file left by a dead process (no lock held) is taken over
    store.fill_path(d).write_bytes(b"partial")
    second = store.claim_fill(d)
    assert second is not None
    with open(store.fill_path(d), "rb") as fh, pytest.raises(BlockingIOError):
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    second.abort()


@pytest.fixture
async def two_workers(aiohttp_server, tmp_path):
    """Two app instances on one store, as two worker processes would be."""
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "data", {"fake.io": up})
    a = await aiohttp_server(create_app(cfg))
    b = await aiohttp_server(create_app(cfg, clean_tmp=False))
    return fake, str(a.make_url("")).rstrip("/"), str(b.make_url("")).rstrip("/"), tmp_path / "data"


async def test_joiners_on_another_worker_tail_the_fill(two_workers):
    fake, a, b, data = two_workers
    fake.chunk_delay = 0.003
    blob = os.urandom(3 * MiB)
    d = fake.add_blob(blob)
    async with aiohttp.ClientSession() as client:
        first = await client.get(f"{a}/v2/x/blobs/{d}")
        await first.content.readexactly(128 * 1024)

        async def pull(url: str) -> bytes:
            async with client.get(f"{url}/v2/y/blobs/{d}") as r:
                return await r.read()

        bodies = await asyncio.gather(*(pull(url) for url in (b, b, b, a)))
        range_part = await (await client.get(f"{b}/v2/y/blobs/{d}",
                                             headers={"Range": "bytes=100-199"})).read()
        rest = await first.read()
    assert all(body == blob for body in bodies)
    assert len(rest) + 128 * 1024 == len(blob)
    assert range_part == blob[100:200]
    assert fake.count("GET", f"/blobs/{d}") == 1
    # clients get their last byte once the digest checked out; the publish (fsync, rename,
    # then the fill's .size/.ok hints go) comes after: wait for it, then for tmp/ to empty
    await wait_stored(data, d)
    await wait_tmp_empty(data)
    assert blob_path(data, d).read_bytes() == blob


async def test_a_failed_fill_aborts_joiners_on_other_workers(two_workers):
    fake, a, b, data = two_workers
    fake.chunk_delay = 0.003
    fake.die_after = 2 * MiB
    d = fake.add_blob(os.urandom(3 * MiB))
    async with aiohttp.ClientSession() as client:
        first = await client.get(f"{a}/v2/x/blobs/{d}")
        await first.content.readexactly(64 * 1024)
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(f"{b}/v2/x/blobs/{d}") as r:
                await r.read()
        with pytest.raises(aiohttp.ClientPayloadError):
            await first.read()
    await wait_tmp_empty(data)  # the aborting fill drops its file and hints just after
    assert not is_stored(data, d)


async def test_two_worker_processes_make_one_upstream_transfer(
    upstream_registry, http_session, tmp_path
):
    reg = upstream_registry
    layer = tmp_path / "layer"
    make_layer_file(layer, 64 * MiB, seed=5)
    img = await push_image(http_session, reg.url, "it/workers", "v1", [layer], schema="oci")
    digest = img.layers[0].digest
    with ProxyProcess(tmp_path / "p", "--upstream", reg.url, "--workers", "2",
                      "--data-dir", str(tmp_path / "data")) as proxy:
        procs = await asyncio.gather(*(
            asyncio.create_subprocess_exec(
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                f"{proxy.url}/v2/it/workers/blobs/{digest}", stdout=subprocess.PIPE)
            for _ in range(16)))
        outs = [(await p.communicate())[0].decode() for p in procs]
    assert outs == [f"200 {64 * MiB}"] * 16
    # one fill: its first GET and three ranged parts (parallel_fills = 4, above 32 MiB)
    assert upstream_gets(reg, f"/blobs/{digest}") == 4


def test_start_up_cleaning_spares_what_live_processes_are_writing(tmp_path):
    _, store = open_filesystem(tmp_path)
    live = store.claim_fill(Digest.of(b"live"))  # another worker, still filling
    assert live is not None
    live.announce_size(123)
    dead = store.fill_path(Digest.of(b"dead"))
    dead.write_bytes(b"half")  # a crashed filler: nobody holds its lock
    (store.tmp_dir / "x.part").write_bytes(b"left by a dead writer")  # young, lock free
    writing = BlobWriter(store.tmp_dir)  # another worker's object temp file: its lock is held
    writing.write(b"being written")
    old_unknown = store.tmp_dir / "older-version.tmp"  # not known to be held: by age
    old_unknown.write_bytes(b"old")
    os.utime(old_unknown, (0, 0))
    (store.tmp_dir / "young-unknown.tmp").write_bytes(b"young")
    store.clean_tmp()
    left = sorted(p.name for p in store.tmp_dir.iterdir())
    fill = store.fill_path(Digest.of(b"live"))
    assert left == sorted([fill.name, fill.with_suffix(".size").name, writing.path.name,
                           "young-unknown.tmp"])
    live.abort()
    writing.abort()


async def test_a_stale_tag_is_revalidated_once_for_all_workers(aiohttp_server, tmp_path):
    """Both workers answer a tag just past its TTL from the cache and start a background
    revalidation; only one of them asks the upstream (a lock file in the store's locks/), and
    the other finds the answer in the store."""
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    # a TTL long enough that the revalidated tag is still fresh at the end, however slow
    # the machine (with 0.3 s a loaded CI runner saw a third revalidation)
    cfg = make_config(tmp_path / "data", {"fake.io": up}, tag_ttl=3.0,
                      tag_stale_while_revalidate=30.0)
    a = str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")
    b = str((await aiohttp_server(create_app(cfg, clean_tmp=False))).make_url("")).rstrip("/")
    d1 = fake.add_image("app", "latest", [b"one"])
    async with aiohttp.ClientSession() as client:
        async def digest_from(base: str) -> str:
            async with client.get(f"{base}/v2/app/manifests/latest") as r:
                assert r.status == 200
                return r.headers["Docker-Content-Digest"]

        assert [await digest_from(a), await digest_from(b)] == [d1, d1]
        d2 = fake.add_image("app", "latest", [b"two"])  # the tag moves upstream
        fake.manifest_delay = 0.3  # both workers' revalidations overlap
        await asyncio.sleep(3.05)  # past the TTL
        assert await asyncio.gather(digest_from(a), digest_from(b)) == [d1, d1]  # stale, at once
        for _ in range(50):
            if fake.count("GET", f"/manifests/{d2}"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)  # a second revalidation would have sent its HEAD by now
        assert fake.count("HEAD", "/app/manifests/latest") == 1
        fake.manifest_delay = 0.0
        assert [await digest_from(a), await digest_from(b)] == [d2, d2]
        assert fake.count("HEAD", "/app/manifests/latest") == 1
    assert not list((tmp_path / "data" / "locks").iterdir())  # the lock's file went with it
