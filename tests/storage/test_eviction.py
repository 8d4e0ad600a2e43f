"""Cache budget: reference-aware LRU eviction of cached content, never of hosted content."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from proxy.app import create_app
from proxy.handlers.common import EVICTOR, PULLTHROUGH, ROUTER, STORE
from proxy.storage.eviction import EvictionReport
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.proxyfix import make_config
from tests.support.store import blob_path, stored_blobs, wait_stored

MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def env(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    data = tmp_path / "data"
    cfg = make_config(data, {"fake.io": up}, hosted=("team/*",), max_size=1 << 40)
    server = await aiohttp_server(create_app(cfg))
    app = server.app
    app[PULLTHROUGH].recency.interval = 0
    async with aiohttp.ClientSession() as client:
        yield fake, str(server.make_url("")).rstrip("/"), data, app, client


def fake_url(app) -> str:
    return str(app[ROUTER].default.base)


async def pull(client, base: str, repo: str, tag: str) -> list[str]:
    """Pull an image through the proxy; returns every digest it consists of."""
    async with client.get(f"{base}/v2/{repo}/manifests/{tag}") as r:
        assert r.status == 200
        manifest = await r.json()
        digests = [r.headers["Docker-Content-Digest"]]
    for desc in [manifest["config"], *manifest["layers"]]:
        async with client.get(f"{base}/v2/{repo}/blobs/{desc['digest']}") as r:
            assert r.status == 200
            assert digest_of(await r.read()) == desc["digest"]
        digests.append(desc["digest"])
    return digests


def age(data, digests: list[str], seconds: float) -> None:
    when = time.time() - seconds
    for d in digests:
        os.utime(blob_path(data, d), (when, when))


async def cache_blob(env, size: int) -> tuple[str, bytes]:
    """A random blob of the upstream, pulled once through the proxy and stored."""
    fake, base, data, _app, client = env
    layer = os.urandom(size)
    d = fake.add_blob(layer)
    async with client.get(f"{base}/v2/x/blobs/{d}") as r:
        assert await r.read() == layer
    await wait_stored(data, d)
    return d, layer


async def run_pass(evictor) -> EvictionReport:
    """One pass now: the app's own background pass (after the fills) may hold the lock."""
    for _ in range(200):
        report = await evictor.run_once()
        if report is not None:
            return report
        await asyncio.sleep(0.05)
    raise AssertionError("the eviction lock stayed busy for 10 s")


async def test_tiny_budget_keeps_recent_and_hosted_drops_old(env):
    fake, base, data, app, client = env
    shared = os.urandom(MiB)
    fake.add_image("old", "v1", [os.urandom(MiB), shared])
    fake.add_image("new", "v1", [os.urandom(MiB // 2), shared])
    old = await pull(client, base, "old", "v1")
    new = await pull(client, base, "new", "v1")
    await wait_stored(data, *old, *new)
    # a hosted image, older than everything, bigger than the budget allows
    hosted_layer = os.urandom(2 * MiB)
    hd = digest_of(hosted_layer)
    async with client.post(f"{base}/v2/team/app/blobs/uploads/?digest={hd}", data=hosted_layer) as r:
        assert r.status == 201
    age(data, old, 3600)
    age(data, new, 60)
    age(data, [hd], 7200)
    app[EVICTOR].max_size = 2 * MiB
    report = await run_pass(app[EVICTOR])
    assert report is not None and report.evicted
    evicted = {str(d) for d, _ in report.evicted}
    assert evicted <= set(old) - {digest_of(shared)}  # only the old image's own content went
    assert digest_of(shared) not in evicted           # the shared layer is still needed
    assert not evicted & set(new)
    assert hd not in evicted and blob_path(data, hd).exists()
    assert report.remaining_bytes <= 2 * MiB
    gets = fake.count("GET", "/old/blobs/")
    assert await pull(client, base, "old", "v1") == old  # evicted parts come from upstream again
    assert fake.count("GET", "/old/blobs/") > gets


async def test_heads_count_as_use_and_max_age(env):
    fake, base, data, app, client = env
    layer = os.urandom(1000)
    d = fake.add_blob(layer)
    async with client.get(f"{base}/v2/x/blobs/{d}") as r:
        await r.read()
    await wait_stored(data, d)
    age(data, [d], 3600)
    async with client.head(f"{base}/v2/x/blobs/{d}") as r:
        assert r.status == 200
    assert time.time() - blob_path(data, d).stat().st_mtime < 60  # recency updated by HEAD
    app[EVICTOR].max_age = 1800
    age(data, [d], 3600)
    report = await run_pass(app[EVICTOR])
    assert report is not None and [str(x) for x, _ in report.evicted] == [d]
    assert not blob_path(data, d).exists()


async def test_eviction_never_breaks_a_concurrent_read(env):
    fake, base, data, app, client = env
    big = os.urandom(4 * MiB)
    d = fake.add_blob(big)
    async with client.get(f"{base}/v2/x/blobs/{d}") as r:
        await r.read()
    await wait_stored(data, d)
    age(data, [d], 3600)
    async with client.get(f"{base}/v2/x/blobs/{d}") as r:  # a slow reader of a cached blob
        first = await r.content.readexactly(64 * 1024)
        app[EVICTOR].max_size = 1
        app[PULLTHROUGH].recency.interval = 3600
        age(data, [d], 3600)
        report = await run_pass(app[EVICTOR])
        assert report is not None and d in {str(x) for x, _ in report.evicted}
        rest = await r.read()
    assert first + rest == big


async def test_budget_is_enforced_after_fills_in_the_background(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    data = tmp_path / "data"
    cfg = make_config(data, {"fake.io": up}, max_size=2 * MiB)
    server = await aiohttp_server(create_app(cfg))
    base = str(server.make_url("")).rstrip("/")
    digests = [fake.add_blob(os.urandom(MiB)) for _ in range(5)]
    async with aiohttp.ClientSession() as client:
        for d in digests:
            async with client.get(f"{base}/v2/x/blobs/{d}") as r:
                await r.read()
            await asyncio.sleep(0.05)
    total = 0
    recent = server.app[EVICTOR].recent  # (time, digest, bytes) of each eviction
    for _ in range(100):  # the evictor runs shortly after the fills (and records after)
        total = sum((await stored_blobs(data)).values())
        if total <= 2 * MiB and len(recent) >= 3:
            break
        await asyncio.sleep(0.1)
    assert total <= 2 * MiB
    assert len(recent) >= 3
    stored = await stored_blobs(data)
    for _when, digest, size in recent:
        assert digest in digests and size == MiB
        assert digest not in stored


async def test_cache_ls_and_purge_commands(env):
    import subprocess
    import sys

    fake, base, data, _app, client = env
    shared = os.urandom(1000)
    fake.add_image("lib/a", "v1", [os.urandom(1000), shared])
    fake.add_image("lib/b", "v1", [shared])
    a = await pull(client, base, "lib/a", "v1")
    b = await pull(client, base, "lib/b", "v1")
    await wait_stored(data, *a, *b)

    config = data.parent / "cli.toml"  # the server's upstreams: they name the cached keys
    config.write_text(f'[proxy]\ndefault_upstream = "fake.io"\n'
                      f'[upstreams."fake.io"]\nurl = "{fake_url(_app)}"\n')

    async def cli(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "cache", *args, "--config", str(config),
            "--data-dir", str(data),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return out.decode()

    listing = await cli("ls")
    assert "lib/a" in listing and "lib/b" in listing and a[0][:19] in listing
    out = await cli("purge", "lib/a:v1")
    assert "purged lib/a:v1: 3 objects" in out  # manifest, config, own layer; not the shared one
    assert not blob_path(data, a[0]).exists() and blob_path(data, digest_of(shared)).exists()
    assert "lib/a" not in await cli("ls")


async def test_evicting_a_manifest_invalidates_the_in_memory_caches(env):
    fake, base, data, app, client = env
    fake.add_image("m", "v1", [os.urandom(1000)])
    digests = await pull(client, base, "m", "v1")
    await wait_stored(data, *digests)
    age(data, digests[:1], 7200)  # the manifest is old...
    age(data, digests[1:], 60)    # ...its blobs were used recently
    app[EVICTOR].max_age = 3600
    report = await run_pass(app[EVICTOR])
    assert report is not None and [str(d) for d, _ in report.evicted] == digests[:1]
    gets = fake.count("GET", "/m/manifests/")
    async with client.get(f"{base}/v2/m/manifests/v1") as r:  # not served from memory
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == digests[0]
    assert fake.count("GET", "/m/manifests/") == gets + 1


async def test_passes_reuse_what_manifests_reference(env, monkeypatch):
    """Manifests never change under their digest: a later pass reuses their parsed
    references instead of reading them again, decides the same, and forgets evicted ones."""
    fake, base, data, app, client = env
    shared = os.urandom(1000)
    fake.add_image("keep", "v1", [os.urandom(1000), shared])
    fake.add_image("drop", "v1", [os.urandom(MiB), shared])
    keep = await pull(client, base, "keep", "v1")
    drop = await pull(client, base, "drop", "v1")
    await wait_stored(data, *keep, *drop)
    evictor = app[EVICTOR]
    store = app[STORE]
    reads: list[str] = []
    real_get = store.get_manifest

    async def counting_get(digest):
        reads.append(str(digest))
        return await real_get(digest)

    monkeypatch.setattr(store, "get_manifest", counting_get)
    first = await run_pass(evictor)
    assert first is not None and not first.evicted and len(reads) >= 2
    reads.clear()
    second = await run_pass(evictor)
    assert second is not None and second.cached_bytes == first.cached_bytes
    assert reads == []  # nothing parsed again
    age(data, drop, 3600)
    age(data, keep, 60)
    evictor.max_age = 1800  # all of "drop" goes; the shared layer is used by "keep"
    await run_pass(evictor)  # (the app's background pass may be the one that evicts)
    assert not any(blob_path(data, d).exists() for d in drop if d != digest_of(shared))
    assert all(blob_path(data, d).exists() for d in keep)
    assert {str(d) for d in evictor._refs} == {keep[0]}  # the evicted manifest is forgotten


async def test_a_blob_gone_between_lookup_and_open_is_looked_up_again(env, monkeypatch):
    """Eviction can remove a stored blob after the handler found it and before it opened
    the file: the request looks again (here: finds it) instead of failing."""
    _fake, base, data, app, client = env
    d, layer = await cache_blob(env, 3000)
    store = app[STORE]
    real = store.local_path
    calls = []

    def vanished_once(digest):
        calls.append(digest)
        return data / "gone" if len(calls) == 1 else real(digest)

    monkeypatch.setattr(store, "local_path", vanished_once)
    async with client.get(f"{base}/v2/x/blobs/{d}", headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206 and await r.read() == layer[10:20]
    assert len(calls) == 2


async def test_stored_blobs_carry_their_digest_as_etag(env):
    """Like distribution: the digest is the ETag, and a client that has it gets a 304."""
    _fake, base, _data, _app, client = env
    d, layer = await cache_blob(env, 2000)
    async with client.get(f"{base}/v2/x/blobs/{d}") as r:
        assert r.status == 200 and r.headers["ETag"] == f'"{d}"' and await r.read() == layer
    async with client.get(f"{base}/v2/x/blobs/{d}", headers={"If-None-Match": f'"{d}"'}) as r:
        assert r.status == 304 and await r.read() == b""
