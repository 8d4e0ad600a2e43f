"""Shared metadata through Redis (aiocache): replicas share upstream tokens and tag
freshness; when Redis is down the proxy carries on without it.

``redis_url`` (conftest.py) is the session's redis-server, emptied before each test."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import pytest

from proxy.app import create_app
from proxy.config import ConfigError, from_dict
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import make_config
from tests.support.registry import free_port


async def test_replicas_share_tokens_and_tag_revalidations(aiohttp_server, tmp_path, redis_url):
    fake = FakeUpstream()
    fake.require_token = "shared-token"
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    shared = tmp_path / "shared-data"  # replicas on one store (as they would on S3)
    bases = []
    for _ in range(2):
        cfg = make_config(shared, {"fake.io": up}, cache_backend="redis", cache_url=redis_url)
        bases.append(str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/"))
    d = fake.add_image("app", "v1", [b"layer"])
    async with aiohttp.ClientSession() as client:
        for base in bases * 2:
            async with client.get(f"{base}/v2/app/manifests/v1") as r:
                assert r.status == 200 and r.headers["Docker-Content-Digest"] == d
    assert fake.token_requests == 1  # the second replica took the token from Redis
    fetched = [x for x in fake.requests if "/manifests/" in x.path and "Authorization" in x.headers]
    assert len(fetched) == 1  # one authorized fetch in all: replica B trusted the shared tag
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    cli = await asyncio.create_subprocess_exec(
        "redis-cli", "-p", port, "--scan", "--pattern", "regproxy:*", stdout=subprocess.PIPE)
    keys = (await cli.communicate())[0].decode().split()
    assert any(k.startswith("regproxy:tag:") for k in keys)
    assert any(k.startswith("regproxy:token:") for k in keys)


async def test_redis_down_degrades_to_the_store(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "d", {"fake.io": up}, cache_backend="redis",
                      cache_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    base = str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")
    d = fake.add_image("app", "v1", [b"layer"])
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"{base}/v2/app/manifests/v1") as r:
                assert r.status == 200 and r.headers["Docker-Content-Digest"] == d
    await asyncio.sleep(0)
    # without the shared cache, freshness still comes from memory and the tag link's mtime
    assert len([x for x in fake.requests if "/manifests/" in x.path]) == 1


def test_cache_backend_config_errors():
    with pytest.raises(ConfigError) as info:
        from_dict({"cache": {"backend": "memcached"}})
    assert info.value.key == "cache.backend"
    with pytest.raises(ConfigError) as info:
        from_dict({"cache": {"backend": "redis"}})
    assert info.value.key == "cache.url"
    with pytest.raises(ConfigError) as info:
        from_dict({"cache": {"backend": "redis", "url": "http://x"}})
    assert info.value.key == "cache.url"
    cfg = from_dict({"cache": {"backend": "redis", "url": "redis://:pw@10.0.0.1:6380/2"}})
    assert (cfg.cache_backend, cfg.cache_url) == ("redis", "redis://:pw@10.0.0.1:6380/2")


async def test_an_open_circuit_is_shared_between_replicas(aiohttp_server, tmp_path, redis_url):
    fake = FakeUpstream()
    fake.status = 503  # the upstream is failing
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    bases = []
    for i in range(2):
        cfg = make_config(tmp_path / f"d{i}", {"fake.io": up}, cache_backend="redis",
                          cache_url=redis_url)
        bases.append(str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/"))
    async with aiohttp.ClientSession() as client:
        for _ in range(3):  # replica A: three failures open its breaker
            async with client.get(f"{bases[0]}/v2/app/manifests/v1") as r:
                assert r.status == 503
        asked = len(fake.requests)
        async with client.get(f"{bases[1]}/v2/app/manifests/v1") as r:  # replica B
            assert r.status == 503
            assert "circuit open on a replica" in (await r.json())["errors"][0]["message"]
    assert len(fake.requests) == asked  # B did not even try the failing upstream


async def test_three_replicas_on_shared_storage_make_one_upstream_transfer(
    upstream_registry, http_session, tmp_path, redis_url
):
    """Three proxy processes (replicas) on one store and one Redis: 30 concurrent cold clients
    spread over them cause exactly one upstream transfer of the blob."""
    from tests.support.images import make_layer_file, push_image
    from tests.support.proxyproc import ProxyProcess
    from tests.support.registry import upstream_gets

    reg = upstream_registry
    layer = tmp_path / "layer"
    make_layer_file(layer, 48 << 20, seed=31)
    img = await push_image(http_session, reg.url, "it/replicas", "v1", [layer], schema="oci")
    digest = img.layers[0].digest
    config = tmp_path / "replica.toml"
    config.write_text(f'[cache]\nbackend = "redis"\nurl = "{redis_url}"\n')
    replicas = [ProxyProcess(tmp_path / f"r{i}", "--config", str(config), "--upstream", reg.url,
                             "--data-dir", str(tmp_path / "shared")).start() for i in range(3)]
    try:
        procs = await asyncio.gather(*(
            asyncio.create_subprocess_exec(
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                f"{replicas[i % 3].url}/v2/it/replicas/blobs/{digest}", stdout=subprocess.PIPE)
            for i in range(30)))
        outs = [(await p.communicate())[0].decode() for p in procs]
    finally:
        for r in replicas:
            r.stop()
    assert outs == [f"200 {48 << 20}"] * 30
    # one fill: its first GET and three ranged parts (parallel_fills = 4, above 32 MiB)
    assert upstream_gets(reg, f"/blobs/{digest}") == 4
