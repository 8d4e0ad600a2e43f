"""Several URLs for one upstream (``urls = [...]``), tried in order: a dead or hanging first
URL costs one timeout per outage (its breaker opens, later requests go straight to the
next), a mirror serving wrong bytes is caught by the digest check, and credentials and
tokens go only to the origin of the URL they belong to."""

from __future__ import annotations

import base64
import os
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import UpstreamURL, from_dict
from proxy.handlers.common import ROUTER, STORE
from proxy.policy.limits import Caps
from proxy.reference import Digest
from proxy.upstream import BreakerState, UpstreamClient
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import make_tar_layer, push_blob, push_image
from tests.support.proxyfix import make_config
from tests.support.registry import free_port, upstream_gets
from tests.support.skopeo import read_oci_layout_index, skopeo_copy

KiB = 1 << 10


async def serve(aiohttp_server, fake: FakeUpstream) -> str:
    return str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")


async def proxy_with(aiohttp_server, tmp_path: Path, urls: list[UpstreamURL], **up: object
                     ) -> tuple[str, UpstreamClient, aiohttp.web.Application]:
    cfg = make_config(tmp_path / "data", {"up.io": urls[0].url})
    first = urls[0]
    cfg = replace(cfg, upstreams={"up.io": replace(
        cfg.upstreams["up.io"], username=first.username, password=first.password,
        more_urls=tuple(urls[1:]), **up)})
    app = create_app(cfg)
    base = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    return base, app[ROUTER].upstreams[0], app


async def test_a_hanging_first_url_costs_one_timeout_then_the_next_url_serves(
        aiohttp_server, tmp_path, upstream_registry, http_session):
    reg = upstream_registry
    layer = os.urandom(64 * KiB)
    images = [await push_image(http_session, reg.url, "it/urls", f"t{i}", [layer], schema="oci")
              for i in range(3)]
    hung = FakeUpstream(manifest_delay=60)  # answers a manifest request never, in effect
    mirror = await serve(aiohttp_server, hung)
    base, up, _ = await proxy_with(aiohttp_server, tmp_path,
                                   [UpstreamURL(mirror), UpstreamURL(reg.url)], header_timeout=1.0)
    for i, img in enumerate(images):
        async with http_session.get(f"{base}/v2/it/urls/manifests/t{i}",
                                    headers={"Accept": img.media_type}) as r:
            assert r.status == 200 and await r.read() == img.manifest
    # one timeout for the outage: the mirror's breaker opened, the later pulls skipped it
    assert hung.count("GET", "/manifests/") == 1
    states = dict(up.url_states())
    assert states[mirror] is BreakerState.OPEN and states[reg.url] is BreakerState.CLOSED
    assert up.breaker.state is BreakerState.CLOSED  # the upstream as a whole is available
    async with http_session.get(f"{base}/status.json") as r:
        assert r.status == 200
        ups = (await r.json())["upstreams"][0]
    assert ups["breaker"] == "closed"
    assert [(u["url"], u["breaker"]) for u in ups["urls"]] == [(mirror, "open"), (reg.url, "closed")]


async def test_a_dead_first_url_falls_over_to_the_next(
        aiohttp_server, tmp_path, upstream_registry, http_session):
    reg = upstream_registry
    data = os.urandom(200 * KiB)
    desc = await push_blob(http_session, reg.url, "it/urls-dead", data)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    base, up, _ = await proxy_with(aiohttp_server, tmp_path,
                                   [UpstreamURL(dead), UpstreamURL(reg.url)])
    async with http_session.get(f"{base}/v2/it/urls-dead/blobs/{desc.digest}") as r:
        assert r.status == 200 and await r.read() == data
    assert dict(up.url_states())[dead] is BreakerState.OPEN
    assert upstream_gets(reg, f"/blobs/{desc.digest}") == 1


async def test_a_lying_mirror_is_caught_by_the_digest_and_nothing_is_cached(
        aiohttp_server, tmp_path, upstream_registry, http_session):
    reg = upstream_registry
    data = os.urandom(300 * KiB)
    desc = await push_blob(http_session, reg.url, "it/urls-lie", data)
    liar = FakeUpstream(corrupt=True)  # serves the blob with its first byte flipped
    assert liar.add_blob(data) == desc.digest
    base, _, app = await proxy_with(aiohttp_server, tmp_path,
                                     [UpstreamURL(await serve(aiohttp_server, liar)),
                                      UpstreamURL(reg.url)])
    url = f"{base}/v2/it/urls-lie/blobs/{desc.digest}"
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http_session.get(url) as r:
            await r.read()  # the last byte never completes: the digest check failed
    assert await app[STORE].blob_size(Digest.parse(desc.digest)) is None
    liar.corrupt = False
    async with http_session.get(url) as r:  # fetched again, not served from a bad copy
        assert r.status == 200 and await r.read() == data
    assert liar.count("GET", f"/blobs/{desc.digest}") == 2


async def test_credentials_and_tokens_go_only_to_their_own_urls_origin(aiohttp_server, tmp_path):
    first = FakeUpstream(require_token="token-of-first")
    second = FakeUpstream(require_basic="bob:second-secret")
    blob = os.urandom(32 * KiB)
    d = first.add_blob(blob)
    second.add_blob(blob)
    a, b = await serve(aiohttp_server, first), await serve(aiohttp_server, second)
    base, up, _ = await proxy_with(aiohttp_server, tmp_path, [
        UpstreamURL(a, "alice", "first-secret"), UpstreamURL(b, "bob", "second-secret")],
        breaker_cooldown=60)
    async with aiohttp.ClientSession() as client:
        async with client.head(f"{base}/v2/app/blobs/{d}") as r:  # first URL: token flow
            assert r.status == 200
        first.status = 503  # the first URL fails now: its breaker opens, the second serves
        async with client.get(f"{base}/v2/other/blobs/{d}") as r:
            assert r.status == 200 and await r.read() == blob
    alice = "Basic " + base64.b64encode(b"alice:first-secret").decode()
    bob = "Basic " + base64.b64encode(b"bob:second-secret").decode()
    seen_first = {r.headers.get("Authorization") for r in first.requests}
    seen_second = {r.headers.get("Authorization") for r in second.requests}
    assert seen_first <= {None, alice, "Bearer token-of-first"} and "Bearer token-of-first" in seen_first
    assert seen_second <= {None, bob} and bob in seen_second
    assert first.token_requests >= 1
    assert dict(up.url_states())[a] is BreakerState.OPEN



async def test_a_url_naming_another_urls_token_service_gives_it_no_credentials(
        aiohttp_server, tmp_path):
    """The mirror challenges with ``realm="http://<the origin's host:port>/token"``: same
    scheme and host, another port, so another origin: bob's credentials stay with the mirror."""
    origin = FakeUpstream(require_token="token-of-origin")
    d = origin.add_blob(os.urandom(KiB))
    a = await serve(aiohttp_server, origin)

    async def challenge(request: web.Request) -> web.Response:
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "x"}]}, status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{a}/token",service="x"'})

    mirror_app = web.Application()
    mirror_app.router.add_get("/v2/{tail:.*}", challenge)
    b = str((await aiohttp_server(mirror_app)).make_url("")).rstrip("/")
    base, _, _ = await proxy_with(aiohttp_server, tmp_path, [
        UpstreamURL(b, "bob", "mirror-secret"), UpstreamURL(a, "alice", "origin-secret")])
    async with aiohttp.ClientSession() as client, client.get(f"{base}/v2/app/blobs/{d}") as r:
        assert r.status == 404  # the mirror's 401 is its answer (mapped as ever)
    bob = "Basic " + base64.b64encode(b"bob:mirror-secret").decode()
    assert origin.token_requests == 0
    assert all(r.headers.get("Authorization") != bob for r in origin.requests)

def test_urls_config_forms_and_errors():
    cfg = from_dict({"upstreams": {"ghcr.io": {"urls": [
        "https://mirror.example", {"url": "https://ghcr.io", "username": "u", "password": "p"}]}}})
    up = cfg.upstreams["ghcr.io"]
    assert [u.url for u in up.urls] == ["https://mirror.example", "https://ghcr.io"]
    assert (up.username, up.urls[1].username, up.urls[1].password) == (None, "u", "p")
    bad = [
        ({"url": "https://a.example", "urls": ["https://b.example"]}, "upstreams.ghcr.io.urls"),
        ({"urls": []}, "upstreams.ghcr.io.urls"),
        ({"urls": ["https://a.example", "https://a.example"]}, "upstreams.ghcr.io.urls"),
        ({"urls": [{"url": "https://a.example", "username": "u"}]},
         "upstreams.ghcr.io.urls[0].password"),
        ({"urls": ["https://a.example"], "username": "u", "password": "p"},
         "upstreams.ghcr.io.username"),
        ({"urls": [{"url": "ftp://a.example"}]}, "upstreams.ghcr.io.urls[0].url"),
    ]
    from proxy.config import ConfigError
    for table, key in bad:
        with pytest.raises(ConfigError) as err:
            from_dict({"upstreams": {"ghcr.io": table}})
        assert key in str(err.value), (table, str(err.value))


async def test_skopeo_pulls_through_a_dead_first_url_under_a_concurrency_cap(
        aiohttp_server, tmp_path, upstream_registry, http_session):
    """End to end with a real client: skopeo copies a four-layer image through a proxy
    whose upstream's first URL refuses connections and whose requests are capped at one
    at a time; every layer arrives intact, requests waited in line rather than failing,
    and the dead URL's breaker is open."""
    reg = upstream_registry
    img = await push_image(http_session, reg.url, "it/urls-skopeo", "v1",
                           [make_tar_layer(seed=2000 + i) for i in range(4)], schema="oci")
    dead = f"http://127.0.0.1:{free_port()}"
    base, up, _ = await proxy_with(aiohttp_server, tmp_path,
                                   [UpstreamURL(dead), UpstreamURL(reg.url)],
                                   limits=Caps(max_concurrent=1, queue=64, max_wait=60))
    host = base.removeprefix("http://")
    out = tmp_path / "out"
    await skopeo_copy(f"docker://{host}/it/urls-skopeo:v1", f"oci:{out}")
    index = read_oci_layout_index(out)
    assert [m["digest"] for m in index["manifests"]] == [img.digest]
    for layer in img.layers:
        blob = out / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
        assert Digest.of(blob.read_bytes()) == Digest.parse(layer.digest)
    assert up.limiter is not None
    assert up.limiter.stats.rejected_full == up.limiter.stats.rejected_timeout == 0
    assert up.limiter.stats.granted >= 1 + len(img.layers)  # manifest, config, layers
    assert dict(up.url_states())[dead] is BreakerState.OPEN
