"""Layer prefetch (issue 20, item 2): a cold image manifest GET starts fills of its config
and layers, so the client's blob GETs join them. Against the real docker-registry upstream
(its access log counts the upstream requests); the fault cases against the fake upstream."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import metrics
from proxy.app import create_app
from proxy.config import Config, ConfigError, PrefetchConfig, from_dict, load
from proxy.pullthrough import prefetch as prefetch_mod
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.images import PushedImage, push_image
from tests.support.proxyfix import make_config
from tests.support.registry import RegistryProcess, upstream_gets, upstream_settled
from tests.support.store import is_stored, wait_stored

MiB = 1 << 20
ACCEPT = {"Accept": ", ".join([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json"])}


async def serve(aiohttp_server: Any, cfg: Config) -> str:
    server = await aiohttp_server(create_app(cfg))
    return f"http://127.0.0.1:{server.port}"


def proxy_config(data: Path, reg: RegistryProcess, **prefetch: Any) -> Config:
    cfg = make_config(data, {"upstream.test": reg.url})
    up = replace(cfg.upstreams["upstream.test"], parallel_fills=1)  # one GET per fill, counted
    return replace(cfg, upstreams={up.name: up}, prefetch=replace(PrefetchConfig(), **prefetch))


async def pushed(session: aiohttp.ClientSession, reg: RegistryProcess, *sizes: int
                 ) -> PushedImage:
    """An image of random layers of ``sizes`` in a repository of its own."""
    repo = f"prefetch/{uuid.uuid4().hex[:12]}"
    return await push_image(session, reg.url, repo, "v1", [os.urandom(s) for s in sizes],
                            schema="oci")


def blobs_of(img: PushedImage) -> list[str]:
    return [img.config.digest, *(layer.digest for layer in img.layers)]


async def get_manifest(session: aiohttp.ClientSession, base: str, repo: str, ref: str,
                       method: str = "GET") -> None:
    async with session.request(method, f"{base}/v2/{repo}/manifests/{ref}", headers=ACCEPT) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def get_blob(session: aiohttp.ClientSession, base: str, repo: str, digest: str) -> bytes:
    async with session.get(f"{base}/v2/{repo}/blobs/{digest}") as r:
        assert r.status == 200, await r.text()
        return await r.read()


def prefetched(outcome: str) -> float:
    """The ``regproxy_prefetch_blobs_total`` figure of ``outcome`` in this process."""
    metrics.flush()
    return float(metrics.child(metrics.PREFETCHES, outcome)._value.get())


async def test_a_manifest_get_stores_the_image_blobs_without_any_blob_get(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 3 * MiB, 100_000)
    base = await serve(aiohttp_server, proxy_config(data, reg))
    started, requested = prefetched("started"), prefetched("requested")
    await get_manifest(client, base, img.repo, "v1")
    await wait_stored(data, *blobs_of(img))
    assert prefetched("started") - started == 3
    for digest in blobs_of(img):
        assert upstream_gets(reg, f"/blobs/{digest}") == 1
    # a client pulling now is served from the store, and counted as a prefetch that paid off
    for layer in img.layers:
        assert len(await get_blob(client, base, img.repo, layer.digest)) == layer.size
    assert prefetched("requested") - requested == 2
    for digest in blobs_of(img):
        assert upstream_gets(reg, f"/blobs/{digest}") == 1


async def test_prefetched_blobs_no_client_asks_for_are_counted_when_they_expire(
        aiohttp_server, upstream_registry, http_session, client, tmp_path, monkeypatch):
    reg, data = upstream_registry, tmp_path / "data"
    first, second = await pushed(http_session, reg, 20_000), await pushed(http_session, reg, 30_000)
    base = await serve(aiohttp_server, proxy_config(data, reg))
    monkeypatch.setattr(prefetch_mod, "UNREQUESTED_AFTER", 0.0)  # (an hour, in production)
    unrequested = prefetched("unrequested")
    await get_manifest(client, base, first.repo, "v1")
    await wait_stored(data, *blobs_of(first))
    await get_manifest(client, base, second.repo, "v1")  # its prefetch expires the first's
    await wait_stored(data, *blobs_of(second))
    assert prefetched("unrequested") - unrequested >= 2


async def test_a_client_joins_the_fill_the_prefetch_runs(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 48 * MiB)
    base = await serve(aiohttp_server, proxy_config(data, reg))
    layer = img.layers[0]
    await get_manifest(client, base, img.repo, "v1")
    body = await get_blob(client, base, img.repo, layer.digest)  # at once: it is filling
    assert len(body) == layer.size and digest_of(body) == layer.digest
    await wait_stored(data, layer.digest)
    await upstream_settled(http_session, reg)
    assert upstream_gets(reg, f"/blobs/{layer.digest}") == 1


async def test_concurrent_pulls_make_one_upstream_get_per_blob(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 16 * MiB, 8 * MiB, 1 * MiB, 20_000)
    base = await serve(aiohttp_server, proxy_config(data, reg, concurrency=2))

    async def pull() -> None:
        await get_manifest(client, base, img.repo, "v1")
        sizes = {layer.digest: layer.size for layer in img.layers}
        bodies = await asyncio.gather(*(get_blob(client, base, img.repo, d) for d in sizes))
        assert [len(b) for b in bodies] == list(sizes.values())

    await asyncio.gather(*(pull() for _ in range(8)))
    await wait_stored(data, *blobs_of(img))
    await upstream_settled(http_session, reg)
    for digest in blobs_of(img):
        assert upstream_gets(reg, f"/blobs/{digest}") == 1


async def test_prefetch_off_fetches_nothing_but_what_the_client_asks_for(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 2 * MiB, 50_000)
    base = await serve(aiohttp_server, proxy_config(data, reg, enabled=False))
    await get_manifest(client, base, img.repo, "v1")
    await get_blob(client, base, img.repo, img.config.digest)
    await upstream_settled(http_session, reg)
    for layer in img.layers:
        assert upstream_gets(reg, f"/blobs/{layer.digest}") == 0
        assert not is_stored(data, layer.digest)


async def test_a_manifest_head_prefetches_nothing(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 2 * MiB)
    base = await serve(aiohttp_server, proxy_config(data, reg))
    await get_manifest(client, base, img.repo, "v1", method="HEAD")
    await get_manifest(client, base, img.repo, img.digest, method="HEAD")
    await upstream_settled(http_session, reg)
    for digest in blobs_of(img):
        assert upstream_gets(reg, f"/blobs/{digest}") == 0
    # a GET of the manifest afterwards does prefetch (it is fetched now)
    await get_manifest(client, base, img.repo, "v1")
    await wait_stored(data, *blobs_of(img))


async def test_layers_past_the_size_cap_are_left_to_the_client(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 4 * MiB, 200_000)
    big, small = img.layers
    base = await serve(aiohttp_server, proxy_config(data, reg, max_bytes=1 * MiB))
    await get_manifest(client, base, img.repo, "v1")
    await wait_stored(data, img.config.digest, small.digest)  # (a smaller one still fits)
    await upstream_settled(http_session, reg)
    assert upstream_gets(reg, f"/blobs/{big.digest}") == 0
    assert not is_stored(data, big.digest)
    assert len(await get_blob(client, base, img.repo, big.digest)) == big.size


async def test_prefetch_serves_only_the_repository_that_fetched_the_manifest(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    """The prefetched blobs are linked to the image's repository only: another repository
    that the upstream does not hold them in still gets a 404."""
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 1 * MiB)
    other = await pushed(http_session, reg, 1000)
    base = await serve(aiohttp_server, proxy_config(data, reg))
    await get_manifest(client, base, img.repo, "v1")
    await wait_stored(data, *blobs_of(img))
    async with client.get(f"{base}/v2/{other.repo}/blobs/{img.layers[0].digest}") as r:
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_blob_already_stored_is_not_fetched_again(
        aiohttp_server, upstream_registry, http_session, client, tmp_path):
    reg, data = upstream_registry, tmp_path / "data"
    img = await pushed(http_session, reg, 1 * MiB, 30_000)
    base = await serve(aiohttp_server, proxy_config(data, reg, enabled=False))
    await get_blob(client, base, img.repo, img.layers[0].digest)  # stored before
    await wait_stored(data, img.layers[0].digest)
    base = await serve(aiohttp_server, proxy_config(data, reg))
    await get_manifest(client, base, img.repo, "v1")
    await wait_stored(data, *blobs_of(img))
    await upstream_settled(http_session, reg)
    for digest in blobs_of(img):
        assert upstream_gets(reg, f"/blobs/{digest}") == 1


# -- faults (the fake upstream) ----------------------------------------------------------


async def test_a_failing_prefetch_does_not_touch_the_client(aiohttp_server, client, tmp_path):
    """A layer the upstream lost, and a foreign layer: the manifest is served, the rest is
    prefetched, the lost layer is the client's own 404 when it asks, the foreign layer is
    never asked for."""
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    data = tmp_path / "data"
    base = await serve(aiohttp_server, make_config(data, {"fake.io": up}))
    kept, lost = os.urandom(MiB), os.urandom(1000)
    digest = fake.add_image("app", "v1", [kept, lost])
    doc = json.loads(fake.manifests[("app", digest)][0])
    foreign = os.urandom(500)
    doc["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                          "digest": fake.add_blob(foreign), "size": len(foreign),
                          "urls": ["https://example.invalid/layer"]})
    fake.add_manifest("app", "v1", json.dumps(doc).encode(), doc["mediaType"])
    del fake.blobs[digest_of(lost)]
    await get_manifest(client, base, "app", "v1")
    await wait_stored(data, digest_of(kept), doc["config"]["digest"])
    async with client.get(f"{base}/v2/app/blobs/{digest_of(lost)}") as r:
        assert r.status == 404
    assert await get_blob(client, base, "app", digest_of(kept)) == kept
    assert fake.count("GET", f"/blobs/{digest_of(kept)}") == 1
    assert fake.count("GET", f"/blobs/{digest_of(foreign)}") == 0


# -- configuration -----------------------------------------------------------------------


def test_prefetch_settings_and_their_errors(tmp_path):
    cfg = from_dict({})
    assert cfg.prefetch == PrefetchConfig(enabled=True, concurrency=16, max_bytes=2 << 30)
    cfg = from_dict({"cache": {"prefetch": "off", "prefetch_concurrency": 3,
                               "prefetch_max_bytes": "512MiB"}})
    assert cfg.prefetch == PrefetchConfig(enabled=False, concurrency=3, max_bytes=512 * MiB)
    for key, value in (("prefetch", "all"), ("prefetch_concurrency", 0),
                       ("prefetch_concurrency", "8"), ("prefetch_max_bytes", "lots")):
        with pytest.raises(ConfigError) as err:
            from_dict({"cache": {key: value}})
        assert err.value.key == f"cache.{key}"
    env = {"REGPROXY_CACHE_PREFETCH": "off", "REGPROXY_CACHE_PREFETCH_CONCURRENCY": "2"}
    assert load(None, env).prefetch == PrefetchConfig(enabled=False, concurrency=2)
