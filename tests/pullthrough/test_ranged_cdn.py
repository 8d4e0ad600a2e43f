"""Ranged fills and cold ranges from a registry that redirects blob GETs to a CDN (Docker
Hub, ghcr.io): the parts go straight to the URL the fill's first GET was redirected to,
without credentials, instead of asking the registry for a new redirect each; a signed URL
that expired (the CDN answers 403) makes them ask the registry again. Against the
fault-injecting fake, as a registry demanding a bearer token and as its CDN."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest

from proxy import metrics
from proxy.app import create_app
from proxy.config import Config
from proxy.settings.prefetch import PrefetchConfig
from tests.pullthrough.test_cold_ranges import LENGTH, SIZE, STALL, START, cold_config, range_header
from tests.pullthrough.test_ranged_fills import MiB, ranged_config
from tests.support.counters import counter
from tests.support.fake_upstream import FakeUpstream, Recorded
from tests.support.store import wait_stored

TOKEN = "registry-token"
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


@dataclass
class Redirecting:
    """A registry whose blob GETs answer 307 to a signed URL on its CDN (another origin)."""

    registry: FakeUpstream
    cdn: FakeUpstream
    url: str  #: the registry's

    def registry_blob_gets(self, digest: str) -> list[Recorded]:
        return [r for r in self.registry.requests if r.method == "GET" and digest in r.path]

    def cdn_gets(self, digest: str) -> list[Recorded]:
        return [r for r in self.cdn.requests if r.method == "GET" and digest in r.path]


@pytest.fixture
async def upstream(aiohttp_server) -> Redirecting:
    cdn = FakeUpstream(ranges=True)
    cdn_url = str((await aiohttp_server(cdn.app())).make_url("")).rstrip("/")
    registry = FakeUpstream(ranges=True, require_token=TOKEN, redirect_to=cdn_url,
                            sign_redirects=True)
    url = str((await aiohttp_server(registry.app())).make_url("")).rstrip("/")
    return Redirecting(registry, cdn, url)


async def start_proxy(aiohttp_server, cfg: Config, *, prefetch: bool = False) -> str:
    cfg = replace(cfg, prefetch=PrefetchConfig(enabled=prefetch))
    return str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")


def put_image(up: Redirecting, layer: bytes) -> str:
    """The image on the registry, its layer also on the CDN; the layer's digest."""
    up.registry.add_image("team/app", "v1", [layer])
    return up.cdn.add_blob(layer)


def requests_counted(status: str) -> float:
    return counter(metrics.UPSTREAM_REQUESTS, "fake.io", "GET", status)


@pytest.mark.parametrize("prefetch", [False, True], ids=["client-get", "prefetch"])
async def test_parts_go_straight_to_the_cdn_url_without_credentials(
        upstream, aiohttp_server, tmp_path, client, prefetch):
    """A docker pull (manifest, then the layer): the registry is asked for the layer once;
    the CDN gets the first GET and the three parts, at the very URL (signature included)
    the registry redirected to, none with the registry's token. With a prefetch the size
    is known, so the first GET is ranged too."""
    data = tmp_path / "data"
    base = await start_proxy(aiohttp_server, ranged_config(data, {"fake.io": upstream.url}),
                             prefetch=prefetch)
    layer = os.urandom(6 * MiB + 1)
    d = put_image(upstream, layer)
    parts_before = counter(metrics.RANGED_PARTS, "fake.io")
    partial_before = requests_counted("206")
    async with client.get(f"{base}/v2/team/app/manifests/v1", headers=ACCEPT) as r:
        assert r.status == 200  # (the token is fetched here, as a pull does)
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == layer
    await wait_stored(data, d)

    at_registry = upstream.registry_blob_gets(d)
    assert len(at_registry) == 1
    assert at_registry[0].headers.get("Authorization") == f"Bearer {TOKEN}"
    at_cdn = upstream.cdn_gets(d)
    step = -(-len(layer) // 4)
    spans = [f"bytes={s}-{min(len(layer), s + step) - 1}" for s in range(0, len(layer), step)]
    assert sorted(upstream.cdn.blob_ranges(d)) == sorted(["" if not prefetch else spans[0],
                                                           *spans[1:]])
    signed = {(r.path, r.query) for r in at_cdn}  # one signed URL (the config blob had one)
    assert len(signed) == 1 and signed.pop()[1].startswith("sig=")
    assert all("Authorization" not in r.headers for r in upstream.cdn.requests)
    assert counter(metrics.RANGED_PARTS, "fake.io") - parts_before == 3
    # the CDN's answers are counted as the upstream's requests (3 parts, and a ranged first GET)
    assert requests_counted("206") - partial_before == 3 + prefetch
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:  # (from the store)
        assert r.status == 200 and await r.read() == layer
    assert len(upstream.registry_blob_gets(d)) == 1


@pytest.mark.parametrize("status", [403, 404, 410, 503, 0])  # (0: no answer)
async def test_an_expired_cdn_url_makes_the_parts_ask_the_registry_again(
        upstream, aiohttp_server, tmp_path, client, status):
    """Each signed URL answers one GET, then 403 (or another refusal, or none): the parts find the
    first GET's URL expired, ask the registry once each (a new signed URL each), and the
    fill completes with the right bytes, no retry counted and nothing sent to the CDN with
    a token."""
    upstream.cdn.signed_url_uses, upstream.cdn.expired_status = 1, status
    data = tmp_path / "data"
    base = await start_proxy(aiohttp_server, ranged_config(data, {"fake.io": upstream.url}))
    layer = os.urandom(6 * MiB + 3)
    d = put_image(upstream, layer)
    retries_before = counter(metrics.RANGED_RETRIES, "fake.io")
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == layer
    await wait_stored(data, d)

    authorized = [r for r in upstream.registry_blob_gets(d) if "Authorization" in r.headers]
    assert len(authorized) == 4  # the first GET, then each part once
    assert all(r.headers.get("Range") for r in authorized)  # (the HEAD told the size)
    uses = dict(upstream.cdn.signature_uses)
    refused = uses.pop("1") - 1  # sig 1: the first GET, then the parts' refusals
    # (aiohttp sends a GET again once when a reused connection closes unanswered)
    assert (refused == 3) if status else (3 <= refused <= 6)
    assert uses == {"2": 1, "3": 1, "4": 1}  # a new URL per part, each answered
    assert all("Authorization" not in r.headers for r in upstream.cdn.requests)
    assert counter(metrics.RANGED_RETRIES, "fake.io") == retries_before
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:  # (from the store)
        assert r.status == 200 and await r.read() == layer


async def test_a_cdn_failing_mid_part_is_asked_again_at_the_same_url(
        upstream, aiohttp_server, tmp_path, client):
    """A ranged body that breaks at the CDN is an ordinary retry from where it stopped, at
    the same URL: the URL still works, the registry is not asked again."""
    data = tmp_path / "data"
    base = await start_proxy(aiohttp_server, ranged_config(data, {"fake.io": upstream.url}))
    layer = os.urandom(6 * MiB)
    d = put_image(upstream, layer)
    upstream.cdn.fail_ranges = 1
    retries_before = counter(metrics.RANGED_RETRIES, "fake.io")
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == layer
    await wait_stored(data, d)
    assert len([r for r in upstream.registry_blob_gets(d) if "Authorization" in r.headers]) == 1
    assert len(upstream.cdn_gets(d)) == 5  # the first GET, three parts, one asked again
    assert counter(metrics.RANGED_RETRIES, "fake.io") - retries_before == 1


async def test_a_registry_redirecting_to_its_own_origin_keeps_asking_it(
        aiohttp_server, tmp_path, client):
    """Same-origin redirects change nothing: every part asks the registry (its token
    included) and follows the redirect there."""
    fake = FakeUpstream(ranges=True, require_token=TOKEN, sign_redirects=True)
    url = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    fake.redirect_to = url
    data = tmp_path / "data"
    base = await start_proxy(aiohttp_server, ranged_config(data, {"fake.io": url}))
    layer = os.urandom(6 * MiB)
    d = fake.add_blob(layer)
    async with client.get(f"{base}/v2/a/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == layer
    await wait_stored(data, d)
    registry_gets = [r for r in fake.requests if r.method == "GET" and r.path == f"/v2/a/blobs/{d}"
                     and "Authorization" in r.headers]
    assert len(registry_gets) == 4
    assert fake.signatures == 4


# -- cold ranges -----------------------------------------------------------------------


async def start_cold_range(up: Redirecting, aiohttp_server, data: Path,
                           client: aiohttp.ClientSession) -> tuple[bytes, str, bytes]:
    """A fill held at :data:`STALL` bytes by the CDN and a cold range near the end asked
    meanwhile (all of it but its last byte comes while the fill is held): the blob, its
    digest and the range's body."""
    up.cdn.stall_after = STALL
    base = await start_proxy(aiohttp_server, cold_config(data, {"fake.io": up.url}))
    blob = os.urandom(SIZE)
    up.registry.add_blob(blob)
    d = up.cdn.add_blob(blob)
    async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header()) as r:
        assert r.status == 206
        head = await r.content.readexactly(LENGTH - 1)
        assert d not in up.cdn.sent_all  # (the fill is still held)
        gets = up.cdn.blob_ranges(d)
        up.cdn.resume.set()
        head += await r.content.read()
    await wait_stored(data, d)
    assert gets[0] == "" and gets[-1] == f"bytes={START}-{START + LENGTH - 2}"
    return blob, d, head


async def test_a_cold_range_goes_straight_to_the_cdn_url(upstream, aiohttp_server, tmp_path,
                                                         client):
    blob, d, body = await start_cold_range(upstream, aiohttp_server, tmp_path / "data", client)
    assert body == blob[START:START + LENGTH]
    assert len([r for r in upstream.registry_blob_gets(d) if "Authorization" in r.headers]) == 1
    assert upstream.cdn.blob_ranges(d) == ["", f"bytes={START}-{START + LENGTH - 2}"]
    assert {r.query for r in upstream.cdn_gets(d)} == {"sig=1"}
    assert all("Authorization" not in r.headers for r in upstream.cdn.requests)


async def test_a_cold_range_whose_cdn_url_expired_asks_the_registry_again(
        upstream, aiohttp_server, tmp_path, client):
    upstream.cdn.signed_url_uses = 1
    blob, d, body = await start_cold_range(upstream, aiohttp_server, tmp_path / "data", client)
    assert body == blob[START:START + LENGTH]
    authorized = [r for r in upstream.registry_blob_gets(d) if "Authorization" in r.headers]
    assert [r.headers.get("Range", "") for r in authorized] == [
        "", f"bytes={START}-{START + LENGTH - 2}"]
    assert upstream.cdn.signature_uses == {"1": 2, "2": 1}  # the fill, a 403; the range
    assert all("Authorization" not in r.headers for r in upstream.cdn.requests)
