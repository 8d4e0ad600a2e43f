"""Parallel ranged fills under an upstream's concurrency cap: a fill's extra parts take only
the slots free right now (clients waiting in line go first), so an idle upstream gets
every part, a busy one fewer, a cap of 1 one stream, and no slot is ever kept: after any
fill, retried, corrupt or cancelled, nothing is in flight."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import metrics
from proxy.app import create_app
from proxy.handlers.common import FILLS, ROUTER
from proxy.policy.limits import Caps, RequestLimiter
from proxy.settings.prefetch import PrefetchConfig
from proxy.upstream import UpstreamClient
from tests.pullthrough.test_ranged_fills import (
    MiB,
    linked,
    prefetch_image,
    ranged_config,
    spans_of,
)
from tests.support.counters import counter
from tests.support.fake_upstream import FakeUpstream
from tests.support.store import is_stored, tmp_files, wait_stored, wait_until


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(ranges=True)


Proxy = tuple[str, Path, UpstreamClient, Any]


async def capped(aiohttp_server: Any, upstream_url: str, tmp_path: Path, caps: Caps, *,
                 prefetch: bool = False) -> Proxy:
    """A proxy with ranged fills from 2 MiB, layer prefetch off (unless asked), and ``caps``."""
    data = tmp_path / "data"
    cfg = replace(ranged_config(data, {"fake.io": upstream_url}, limits=caps),
                  prefetch=PrefetchConfig(enabled=prefetch))
    app = create_app(cfg)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), data, app[ROUTER].upstreams[0], app


def limiter_of(up: UpstreamClient) -> RequestLimiter:
    assert up.limiter is not None
    return up.limiter


async def pull(client: aiohttp.ClientSession, url: str) -> bytes:
    async with client.get(url) as r:
        assert r.status == 200
        return await r.read()


@pytest.mark.parametrize(("cap", "parts"), [(4, 4), (2, 2), (3, 3)])
async def test_an_idle_capped_upstream_gives_a_fill_as_many_parts_as_free_slots(
        aiohttp_server, upstream_url, tmp_path, fake, client, cap, parts):
    base, data, up, _ = await capped(aiohttp_server, upstream_url, tmp_path,
                                     Caps(max_concurrent=cap))
    blob = os.urandom(6 * MiB + 7)
    d = await linked(fake, base, client, blob)  # a plain first GET, then the parts
    assert await pull(client, f"{base}/v2/team/app/blobs/{d}") == blob
    await wait_stored(data, d)
    assert sorted(fake.blob_ranges(d)) == sorted(["", *spans_of(len(blob), parts)[1:]])
    await wait_until(lambda: limiter_of(up).in_flight == 0, "every slot given back")
    other = os.urandom(6 * MiB + 3)  # no link: the HEAD tells the size, every GET is ranged
    d2 = fake.add_blob(other)
    assert await pull(client, f"{base}/v2/team/app/blobs/{d2}") == other
    await wait_stored(data, d2)
    assert sorted(fake.blob_ranges(d2)) == sorted(spans_of(len(other), parts))
    await wait_until(lambda: limiter_of(up).in_flight == 0, "every slot given back")


async def test_a_cap_of_one_fills_as_one_stream(aiohttp_server, upstream_url, tmp_path, fake,
                                                client):
    base, data, up, _ = await capped(aiohttp_server, upstream_url, tmp_path,
                                     Caps(max_concurrent=1))
    blob = os.urandom(6 * MiB)
    d = await linked(fake, base, client, blob)
    assert await pull(client, f"{base}/v2/team/app/blobs/{d}") == blob
    other = os.urandom(6 * MiB)
    d2 = fake.add_blob(other)
    assert await pull(client, f"{base}/v2/team/app/blobs/{d2}") == other
    await wait_stored(data, d, d2)
    assert fake.blob_ranges(d) == [""] and fake.blob_ranges(d2) == [""]
    await wait_until(lambda: limiter_of(up).in_flight == 0, "every slot given back")


async def test_a_busy_upstream_gives_a_fill_only_the_slots_left(aiohttp_server, upstream_url,
                                                                tmp_path, fake, client):
    """Two slots of four held elsewhere: the fill's first GET takes one, its parts the last."""
    base, data, up, _ = await capped(aiohttp_server, upstream_url, tmp_path,
                                     Caps(max_concurrent=4))
    blob = os.urandom(6 * MiB)
    d = await linked(fake, base, client, blob)
    limiter = limiter_of(up)
    assert limiter.try_acquire(2) == 2
    try:
        assert await pull(client, f"{base}/v2/team/app/blobs/{d}") == blob
    finally:
        limiter.release()
        limiter.release()
    await wait_stored(data, d)
    assert sorted(fake.blob_ranges(d)) == sorted(["", *spans_of(len(blob), 2)[1:]])
    await wait_until(lambda: limiter.in_flight == 0, "every slot given back")


class HandClock:
    """Time moves only when the test says; timers are kept, never fired."""

    class Timer:
        def cancel(self) -> None:
            pass

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> HandClock.Timer:
        return HandClock.Timer()


async def test_a_client_waiting_in_line_goes_before_a_fills_extra_parts(
        aiohttp_server, upstream_url, tmp_path, fake, client):
    """Tokens came back while a client waits for one (its wake-up not yet run): the fill
    planning meanwhile must not take them; it fills as one stream."""
    base, data, up, _ = await capped(aiohttp_server, upstream_url, tmp_path,
                                     Caps(max_concurrent=8))
    blob = os.urandom(6 * MiB)
    d = await linked(fake, base, client, blob)
    clock = HandClock()
    limiter = up.limiter = RequestLimiter("fake.io", Caps(rate=1, burst=8, max_wait=600), clock)
    fake.answer_gate = asyncio.Event()
    get = asyncio.create_task(pull(client, f"{base}/v2/team/app/blobs/{d}"))
    await wait_until(lambda: fake.count("GET", f"/blobs/{d}") == 1, "the fill's first GET")
    drained = limiter.try_acquire(100)  # the bucket is empty now
    for _ in range(drained):
        limiter.release()
    waiting = asyncio.create_task(limiter.acquire())
    await wait_until(lambda: limiter.queued == 1, "a client in line")
    clock.now += 5  # five tokens earned; the client's wake-up has not run yet
    fake.answer_gate.set()
    try:
        assert await get == blob
        await wait_stored(data, d)
        assert fake.blob_ranges(d) == [""]  # no extra part: the client is first in line
        await waiting  # (granted when the fill's slot came back, at the latest)
        limiter.release()
    finally:
        waiting.cancel()
    assert limiter.in_flight == 0 and limiter.queued == 0


async def test_retried_and_corrupt_parts_give_every_slot_back(aiohttp_server, upstream_url,
                                                              tmp_path, fake, client):
    base, data, up, _ = await capped(aiohttp_server, upstream_url, tmp_path,
                                     Caps(max_concurrent=4))
    limiter = limiter_of(up)
    blob = os.urandom(6 * MiB)
    d = fake.add_blob(blob)
    fake.fail_ranges = 2
    before = counter(metrics.RANGED_RETRIES, "fake.io")
    assert await pull(client, f"{base}/v2/a/blobs/{d}") == blob
    await wait_stored(data, d)
    assert len(fake.blob_ranges(d)) == 6  # four parts, two of them asked again
    assert counter(metrics.RANGED_RETRIES, "fake.io") - before == 2
    await wait_until(lambda: limiter.in_flight == 0, "every slot given back after retries")
    assert limiter.stats.granted >= 4 and limiter.queued == 0

    fake.fail_ranges = 1000  # every part fails until the fill gives up
    d2 = fake.add_blob(os.urandom(6 * MiB))
    with pytest.raises(aiohttp.ClientPayloadError):
        await pull(client, f"{base}/v2/a/blobs/{d2}")
    await wait_until(lambda: tmp_files(data) == [], "the failed fill's temp files to go")
    await wait_until(lambda: limiter.in_flight == 0, "every slot given back")

    fake.fail_ranges, fake.corrupt_ranges = 0, True
    d3 = fake.add_blob(os.urandom(6 * MiB))
    with pytest.raises(aiohttp.ClientPayloadError):
        await pull(client, f"{base}/v2/a/blobs/{d3}")
    await wait_until(lambda: tmp_files(data) == [], "the corrupt fill's temp files to go")
    assert not is_stored(data, d3)
    await wait_until(lambda: limiter.in_flight == 0, "every slot given back")


async def test_a_fill_cancelled_mid_way_gives_every_slot_back(aiohttp_server, upstream_url,
                                                              tmp_path, fake, client):
    base, data, up, app = await capped(aiohttp_server, upstream_url, tmp_path,
                                       Caps(max_concurrent=4))
    limiter = limiter_of(up)
    fake.chunk_delay = 0.02  # a slow upstream: the fill is still running when cancelled
    blob = os.urandom(6 * MiB)
    d = await linked(fake, base, client, blob)
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200
        await r.content.readexactly(64 * 1024)
        await wait_until(lambda: len(fake.blob_ranges(d)) == 4, "every part asked")
        assert limiter.in_flight == 4
    # the client went away; the fill goes on until the proxy shuts down
    await app[FILLS].close()
    await wait_until(lambda: limiter.in_flight == 0, "every slot given back")
    await wait_until(lambda: tmp_files(data) == [], "the cancelled fill's temp files to go")
    assert not is_stored(data, d)


async def test_a_size_known_wrongly_gives_its_planned_slots_back_before_asking_again(
        aiohttp_server, upstream_url, tmp_path, fake, client):
    """A descriptor one byte too big: the first range's 206 names the real size, the fill
    asks again plainly under its first slot and plans its parts anew; nothing is kept."""
    base, data, up, _ = await capped(aiohttp_server, upstream_url, tmp_path,
                                     Caps(max_concurrent=4), prefetch=True)
    layer = os.urandom(6 * MiB)
    d = await prefetch_image(fake, base, client, data, layer, size_error=1)
    gets = fake.blob_ranges(d)
    assert gets[1] == "" and len(gets) >= 2  # the wrong first range, then a plain GET
    assert await pull(client, f"{base}/v2/team/app/blobs/{d}") == layer
    await wait_until(lambda: limiter_of(up).in_flight == 0, "every slot given back")
