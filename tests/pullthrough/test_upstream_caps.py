"""Per-upstream caps (``[upstreams.<name>.limits]``) through the proxy: concurrency never
exceeds ``max_concurrent`` (counted at the upstream), over the cap requests wait, a full
queue or a long wait is a 503 with Retry-After (never a 429), busy answers do not count
against the breaker, a burst of identical requests costs one slot (single flight), fills
pass through the bandwidth bucket, and ``ratelimit-remaining`` near zero slows the rate."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.handlers.common import ROUTER
from proxy.policy.limits import Caps
from proxy.upstream import BreakerState, UpstreamClient
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import push_blob
from tests.support.proxyfix import make_config
from tests.support.registry import upstream_gets
from tests.support.store import wait_until

KiB = 1 << 10


class Counting:
    """A middleware for the fake: requests in flight to it now, and the most ever."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.headers: dict[str, str] = {}  #: added to every answer not yet sent

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[
            [web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            resp = await handler(request)
            if not resp.prepared:
                resp.headers.update(self.headers)
            return resp
        finally:
            self.now -= 1


async def proxy_for(aiohttp_server, tmp_path: Path, fake: FakeUpstream, counting: Counting,
                    caps: Caps, **up: object) -> tuple[str, UpstreamClient]:
    app = fake.app()
    app.middlewares.insert(0, counting.middleware)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "data", {"fake.io": url})
    cfg = replace(cfg, upstreams={"fake.io": replace(cfg.upstreams["fake.io"], limits=caps, **up)})
    proxy_app = create_app(cfg)
    server = await aiohttp_server(proxy_app)
    return str(server.make_url("")).rstrip("/"), proxy_app[ROUTER].upstreams[0]


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, bytes, Mapping[str, str]]:
    async with client.get(url) as r:
        return r.status, await r.read(), r.headers


async def test_concurrency_never_exceeds_the_cap_and_the_rest_wait(aiohttp_server, tmp_path):
    fake, counting = FakeUpstream(stall_after=64 * KiB), Counting()
    blobs = [os.urandom(256 * KiB) for _ in range(8)]
    digests = [fake.add_blob(b) for b in blobs]
    base, up = await proxy_for(aiohttp_server, tmp_path, fake, counting, Caps(max_concurrent=2))
    assert up.limiter is not None
    async with aiohttp.ClientSession() as client:
        gets = [asyncio.create_task(_get(client, f"{base}/v2/app/blobs/{d}")) for d in digests]
        # two stalled at the upstream, the rest waiting at the proxy
        await wait_until(lambda: up.limiter is not None and up.limiter.queued == 6
                         and counting.now == 2, "2 requests upstream, 6 queued", patience=20)
        assert up.limiter.in_flight == 2
        fake.resume.set()
        results = await asyncio.gather(*gets)
    assert [(status, body) for status, body, _ in results] == [(200, b) for b in blobs]
    assert counting.peak <= 2
    assert up.limiter.stats.waited >= 6 and up.limiter.queued == 0 and up.limiter.in_flight == 0


async def test_a_full_queue_and_a_long_wait_are_503_with_retry_after_not_429(
        aiohttp_server, tmp_path):
    fake, counting = FakeUpstream(stall_after=64 * KiB), Counting()
    blobs = [os.urandom(256 * KiB) for _ in range(3)]
    a, b, c = (fake.add_blob(x) for x in blobs)
    base, up = await proxy_for(aiohttp_server, tmp_path, fake, counting,
                               Caps(max_concurrent=1, queue=1, max_wait=1.0),
                               breaker_threshold=1)  # one counted failure would open it
    async with aiohttp.ClientSession() as client:
        first = await client.get(f"{base}/v2/app/blobs/{a}")  # holds the one slot, stalled
        try:
            assert first.status == 200
            waiting = asyncio.create_task(_get(client, f"{base}/v2/app/blobs/{b}"))
            await wait_until(lambda: up.limiter is not None and up.limiter.queued == 1,
                             "one queued", patience=20)
            status, body, headers = await _get(client, f"{base}/v2/app/blobs/{c}")  # queue full
            assert status == 503 and headers["Retry-After"] == "1"
            assert b"UNAVAILABLE" in body and b"at its cap" in body
            status, body, headers = await waiting  # max_wait passed
            assert status == 503 and headers["Retry-After"] == "1"
            assert b"no slot within 1 s" in body
            assert up.breaker.state is BreakerState.CLOSED  # busy is no upstream failure
            fake.resume.set()
            assert await first.read() == blobs[0]
        finally:
            first.close()
        status, body, _ = await _get(client, f"{base}/v2/app/blobs/{c}")  # a slot is free again
        assert (status, body) == (200, blobs[2])
    assert up.breaker.state is BreakerState.CLOSED
    assert up.limiter is not None
    assert (up.limiter.stats.rejected_full, up.limiter.stats.rejected_timeout) == (1, 1)
    assert fake.count("GET", f"/blobs/{b}") == 0  # the refused requests never went upstream


async def test_a_burst_of_identical_requests_costs_one_slot(
        aiohttp_server, tmp_path, upstream_registry, http_session):
    reg = upstream_registry
    data = os.urandom(512 * KiB)
    desc = await push_blob(http_session, reg.url, "it/caps", data)
    cfg = make_config(tmp_path / "data", {"reg.io": reg.url})
    # one slot, no queue: a second upstream request at the same time would be a 503
    cfg = replace(cfg, upstreams={"reg.io": replace(cfg.upstreams["reg.io"], limits=Caps(
        max_concurrent=1, queue=0))})
    app = create_app(cfg)
    base = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    up = app[ROUTER].upstreams[0]
    assert up.limiter is not None
    url = f"{base}/v2/it/caps/blobs/{desc.digest}"
    async with http_session.head(url) as r:  # links the blob to the repository: no more HEADs
        assert r.status == 200
    before, granted = upstream_gets(reg, f"/blobs/{desc.digest}"), up.limiter.stats.granted
    results = await asyncio.gather(*(_get(http_session, f"{base}/v2/it/caps/blobs/{desc.digest}")
                                     for _ in range(12)))
    assert [(s, body) for s, body, _ in results] == [(200, data)] * 12
    assert up.limiter.stats.granted - granted == 1
    assert upstream_gets(reg, f"/blobs/{desc.digest}") - before == 1


async def test_fills_pass_through_the_bandwidth_cap(aiohttp_server, tmp_path):
    fake, counting = FakeUpstream(), Counting()
    blob = os.urandom(300 * KiB)
    d = fake.add_blob(blob)
    base, up = await proxy_for(aiohttp_server, tmp_path, fake, counting,
                               Caps(bandwidth=64 * 1024 * 1024))
    assert up.limiter is None and up.bandwidth is not None
    async with aiohttp.ClientSession() as client:
        status, body, _ = await _get(client, f"{base}/v2/app/blobs/{d}")
    assert (status, body) == (200, blob)
    assert up.bandwidth.bytes == len(blob)


async def test_ratelimit_remaining_near_zero_slows_the_rate(aiohttp_server, tmp_path):
    fake, counting = FakeUpstream(), Counting()
    fake.add_image("app", "v1", [b"layer"])
    base, up = await proxy_for(aiohttp_server, tmp_path, fake, counting, Caps(rate=100, burst=50))
    assert up.limiter is not None
    async with aiohttp.ClientSession() as client:
        counting.headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "5;w=21600"}
        assert (await _get(client, f"{base}/v2/app/manifests/v1"))[0] == 200
        assert up.limiter.slowed and up.limiter.rate == 50
        assert up.ratelimit_remaining == "5;w=21600"


@pytest.mark.parametrize("limits, problem", [
    ({"max_concurrent": -1}, "max_concurrent"),
    ({"rate": "ten"}, "rate"),
    ({"max_wait": 0}, "max_wait"),
    ({"queue_size": 3}, "queue_size"),
])
def test_a_bad_cap_names_its_key(limits, problem):
    from proxy.config import ConfigError
    from proxy.settings.upstreams import parse_upstream
    with pytest.raises(ConfigError) as err:
        parse_upstream("ghcr.io", {"url": "https://ghcr.io", "limits": limits})
    assert f"upstreams.ghcr.io.limits.{problem}" in str(err.value)
