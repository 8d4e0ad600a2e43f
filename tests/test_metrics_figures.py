"""What the metrics say about an operator's cache: sizes that agree with the store."""

from __future__ import annotations

import os

import aiohttp
from prometheus_client import REGISTRY

from proxy import metrics
from proxy.app import create_app
from proxy.handlers.common import EVICTOR, PULLTHROUGH
from proxy.reference import Digest
from proxy.storage.gc import image_size
from tests.support.images import push_image
from tests.support.proxyfix import make_config


def sample(name: str, **labels: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


def blob_bytes_on_disk(data) -> int:
    return sum(p.stat().st_size for p in (data / "blobs").rglob("*") if p.is_file())


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
    store = app[PULLTHROUGH].store
    cached = await image_size(store, Digest.parse(img.digest))  # what `cache ls` lists
    assert sample("regproxy_cache_size_bytes") == cached
    kinds = {k: sample("regproxy_store_size_bytes", kind=k) for k in ("cached", "shared", "hosted")}
    # the cached image's manifest and config are the cache's own; its layers are shared
    assert kinds["cached"] == len(img.manifest) + len(img.config_bytes)
    assert kinds["shared"] == sum(len(x) for x in layers)
    assert kinds["hosted"] == len(hosted.manifest) + len(hosted.config_bytes) + len(hosted_only)
    assert cached == kinds["cached"] + kinds["shared"]
    assert sum(kinds.values()) == blob_bytes_on_disk(data)
