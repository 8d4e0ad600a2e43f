"""What the metrics say an operator's cache is doing: build, client latency, fills in
flight, bytes saved, disk space, sizes that agree with the store, and cache outcomes that
only count cache reads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import platform

import aiohttp
from prometheus_client import REGISTRY

from proxy import __version__, metrics
from proxy.app import create_app
from proxy.handlers.common import EVICTOR, STORE
from proxy.reference import Digest
from proxy.server import runner_kwargs
from proxy.settings.auth import parse_auth
from proxy.storage.gc import image_size
from tests.support.edge import write_htpasswd
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import blob_exists, push_image, sha256_digest
from tests.support.proxyfix import make_config
from tests.support.store import blob_path, stored_blobs

OUTCOMES = ("hit", "miss", "coalesced", "stale", "revalidated", "refreshing", "not_found",
            "error", "upstream_error", "hosted", "-")


def sample(name: str, **labels: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


def cache_reads() -> dict[str, float]:
    """Cache reads by outcome, manifests and blobs together."""
    return {o: sum(sample("regproxy_cache_requests_total", kind=k, outcome=o)
                   for k in ("manifest", "blob")) for o in OUTCOMES}


def latency_count(route: str, cache: str) -> float:
    return sample("regproxy_request_duration_seconds_count", route=route, cache=cache)


async def wait_until(what: str, check) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


async def test_build_latency_fills_in_flight_saved_bytes_and_disk(aiohttp_server, tmp_path):
    fake = FakeUpstream()  # slow on purpose: a fill must be seen in flight
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "d", {"fig.io": up})
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    blob = os.urandom(2 << 20)
    d = fake.add_blob(blob)
    broken = fake.add_blob(os.urandom(2 << 20))
    fake.add_image("fig/app", "v1", [b"layer"])
    assert sample("regproxy_build_info", version=__version__,
                  python=platform.python_version()) == 1

    def fills(result: str) -> float:
        return sample("regproxy_fills_total", upstream="fig.io", result=result)

    def in_flight() -> float:
        return sample("regproxy_fills_in_flight", upstream="fig.io")

    before = {"ok": fills("ok"), "failed": fills("failed"), "in_flight": in_flight(),
              "miss": latency_count("get_blob", "miss"), "hit": latency_count("get_blob", "hit"),
              "manifest_hit": latency_count("get_manifest", "hit"),
              "saved_blob": sample("regproxy_bytes_saved_total", kind="blob"),
              "saved_manifest": sample("regproxy_bytes_saved_total", kind="manifest")}
    fake.chunk_delay = 0.01
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/v2/fig/app/blobs/{d}") as r:
            await r.content.readexactly(64 * 1024)
            await wait_until("the fill counted in flight", lambda: in_flight() == before["in_flight"] + 1)
            fake.chunk_delay = 0.0
            assert await r.read() == blob[64 * 1024:]
        await wait_until("the fill done", lambda: fills("ok") == before["ok"] + 1)
        assert in_flight() == before["in_flight"]
        stored = blob_path(tmp_path / "d", d)
        await wait_until("the blob stored", stored.exists)
        async with client.get(f"{base}/v2/fig/app/blobs/{d}") as r:  # a hit
            assert await r.read() == blob
        async with client.get(f"{base}/v2/fig/app/manifests/v1") as r:  # a miss
            manifest = await r.read()
        async with client.get(f"{base}/v2/fig/app/manifests/v1") as r:  # a hit
            assert await r.read() == manifest
        fake.die_after = 1 << 20
        async with client.get(f"{base}/v2/fig/app/blobs/{broken}") as r:
            with contextlib.suppress(aiohttp.ClientPayloadError):  # the upstream died
                await r.read()
        await wait_until("the failed fill counted", lambda: fills("failed") == before["failed"] + 1)
        assert in_flight() == before["in_flight"]
        async with client.get(f"{base}/metrics") as r:
            text = await r.text()

    assert latency_count("get_blob", "miss") == before["miss"] + 1
    assert latency_count("get_blob", "hit") == before["hit"] + 1
    assert latency_count("get_manifest", "hit") == before["manifest_hit"] + 1
    assert sample("regproxy_request_duration_seconds_bucket", route="get_blob", cache="hit",
                  le="+Inf") == latency_count("get_blob", "hit")
    assert sample("regproxy_request_duration_seconds_sum", route="get_blob", cache="miss") > 0
    # the hit and the cached manifest needed no upstream transfer; the miss did
    assert sample("regproxy_bytes_saved_total", kind="blob") - before["saved_blob"] == len(blob)
    assert sample("regproxy_bytes_saved_total",
                  kind="manifest") - before["saved_manifest"] == len(manifest)
    st = os.statvfs(tmp_path / "d")
    assert sample("regproxy_disk_size_bytes") == st.f_blocks * st.f_frsize
    assert 0 < sample("regproxy_disk_free_bytes") <= sample("regproxy_disk_size_bytes")
    for name in ("regproxy_build_info", "regproxy_request_duration_seconds_bucket",
                 "regproxy_fills_in_flight", "regproxy_bytes_saved_total",
                 "regproxy_disk_free_bytes"):
        assert name in text


async def blob_bytes_on_disk(data) -> int:
    return sum((await stored_blobs(data)).values())


async def test_cache_size_counts_content_shared_with_hosted_images(
    upstream_registry, http_session, aiohttp_server, tmp_path
):
    """An image pulled through the cache, then imported into a hosted repository (same
    blobs) plus one hosted-only layer: the cache size is what the cached image uses, and
    the three kinds add up to every blob in the store."""
    layers = [os.urandom(300_000), os.urandom(200_000)]
    img = await push_image(http_session, upstream_registry.url, "it/shared", "v1", layers,
                           schema="oci")
    data = tmp_path / "data"
    cfg = make_config(data, {"reg.io": upstream_registry.url}, hosted=("team/*",))
    server = await aiohttp_server(create_app(cfg))
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/v2/it/shared/manifests/v1") as r:
            assert r.status == 200
        for desc in [img.config, *img.layers]:
            async with client.get(f"{base}/v2/it/shared/blobs/{desc.digest}") as r:
                assert r.status == 200
                await r.read()
        hosted_only = os.urandom(100_000)
        hosted = await push_image(client, base, "team/imported", "v1", [*layers, hosted_only],
                                  schema="oci")
    app = server.app
    report = await app[EVICTOR].run_once()
    assert report is not None
    store = app[STORE]
    cached = await image_size(store, Digest.parse(img.digest))  # what `cache ls` lists
    assert sample("regproxy_cache_size_bytes") == cached
    kinds = {k: sample("regproxy_store_size_bytes", kind=k) for k in ("cached", "shared", "hosted")}
    # the cached image's manifest and config are the cache's own; its layers are shared
    assert kinds["cached"] == len(img.manifest) + len(img.config_bytes)
    assert kinds["shared"] == sum(len(x) for x in layers)
    assert kinds["hosted"] == len(hosted.manifest) + len(hosted.config_bytes) + len(hosted_only)
    assert cached == kinds["cached"] + kinds["shared"]
    assert sum(kinds.values()) == await blob_bytes_on_disk(data)


async def test_only_cache_reads_count_as_cache_outcomes(
    upstream_registry, http_session, aiohttp_server, tmp_path
):
    """A push's HEAD checks and reads of hosted repositories, a tag the upstream does not
    have, and requests refused for lack of credentials are no cache errors (nor hits)."""
    await push_image(http_session, upstream_registry.url, "it/outcomes", "v1",
                     [os.urandom(50_000)], schema="oci")
    cfg = make_config(tmp_path / "data", {"reg.io": upstream_registry.url}, hosted=("team/*",))
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    before = cache_reads()
    hosted_bytes = sample("regproxy_bytes_served_total", source="hosted")
    layer = os.urandom(40_000)
    async with aiohttp.ClientSession() as client:
        assert await blob_exists(client, base, "team/app", sha256_digest(layer)) is None  # 404
        pushed = await push_image(client, base, "team/app", "v1", [layer], schema="oci")
        assert await blob_exists(client, base, "team/app", pushed.layers[0].digest) == len(layer)
        async with client.get(f"{base}/v2/team/app/manifests/v1") as r:
            assert r.status == 200
        async with client.get(f"{base}/v2/team/app/manifests/nothere") as r:
            assert r.status == 404
        async with client.get(f"{base}/v2/team/app/blobs/{pushed.layers[0].digest}") as r:
            assert await r.read() == layer
        async with client.get(f"{base}/v2/it/outcomes/manifests/nothere") as r:
            assert r.status == 404  # the upstream has no such tag
        async with client.get(f"{base}/v2/it/outcomes/manifests/v1") as r:
            assert r.status == 200
    after = cache_reads()
    moved = {o: after[o] - before[o] for o in OUTCOMES if after[o] != before[o]}
    assert moved == {"not_found": 1, "miss": 1}, moved
    assert sample("regproxy_bytes_served_total", source="hosted") - hosted_bytes == len(layer)


async def test_refused_requests_are_no_cache_reads_and_failures_still_are_errors(
    aiohttp_server, tmp_path
):
    """With [auth], the 401 of ``/v2/`` and of a manifest read are no cache outcomes; an
    upstream that cannot be reached still counts as a cache ``error``."""
    write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pw"})
    auth = parse_auth({"htpasswd": "htpasswd", "rules": [
        {"users": ["alice"], "repositories": ["library/*"], "actions": ["pull"]}]}, tmp_path)
    alice = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-pw").decode()}
    cfg = make_config(tmp_path / "data", {"docker.io": "http://127.0.0.1:9"}, auth=auth)
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    before = cache_reads()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/v2/") as r:
            assert r.status == 401
        async with client.get(f"{base}/v2/private/app/manifests/v1") as r:
            assert r.status == 401
        async with client.get(f"{base}/v2/private/app/blobs/sha256:{'0' * 64}") as r:
            assert r.status == 401
        async with client.get(f"{base}/v2/library/app/manifests/v1", headers=alice) as r:
            assert r.status == 503  # allowed, but nothing listens upstream
    after = cache_reads()
    moved = {o: after[o] - before[o] for o in OUTCOMES if after[o] != before[o]}
    assert moved == {"error": 1}, moved
