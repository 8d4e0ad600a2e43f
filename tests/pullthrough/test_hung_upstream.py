"""An upstream that accepts connections and never answers (SIGSTOP): cached tags keep
being answered at once, the breaker is one for all workers, and its probes go upstream in
the background, one per cycle."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from proxy.config import UpstreamConfig
from proxy.upstream.breaker import BreakerState, CircuitBreaker
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import push_image
from tests.support.proxyfix import make_config
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import RegistryProcess, upstream_requests

MANIFESTS = "/it/hung/manifests/"


def _config(path: Path, upstream: str, *, header_timeout: float) -> Path:
    path.write_text(f"""
[cache]
tag_ttl = "1s"
tag_stale_while_revalidate = "0s"
[proxy]
default_upstream = "hung.test"
[upstreams."hung.test"]
url = "{upstream}"
header_timeout = {header_timeout}
read_timeout = 30
breaker_threshold = 1
breaker_cooldown = 1
""")
    return path


async def _wait_for(condition, what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# Every probe of the hung upstream waits 30 s (header_timeout): a client that waited for
# one, or a second worker asking on its own, would blow this timeout.
@pytest.mark.timeout(25)
async def test_a_hung_upstream_never_holds_up_cached_tags_with_two_workers(
        fresh_registry: RegistryProcess, http_session, tmp_path):
    reg = fresh_registry
    img = await push_image(http_session, reg.url, "it/hung", "v1", [b"hung layer"], schema="oci")
    cfg = _config(tmp_path / "config.toml", reg.url, header_timeout=30)
    with ProxyProcess(tmp_path / "p", "--config", str(cfg), "--workers", "2",
                      "--data-dir", str(tmp_path / "data")) as proxy:
        # one connection per request, so that both workers (SO_REUSEPORT) get requests
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         trust_env=False) as client:
            async def pull(method: str = "GET") -> str:
                async with client.request(method, f"{proxy.url}/v2/it/hung/manifests/v1") as r:
                    assert r.status == 200, await r.text()
                    return r.headers["Docker-Content-Digest"]

            assert await pull() == img.digest
            # the upstream goes away (connections refused): one fast failure opens the
            # breaker, for both workers
            reg.stop()
            await asyncio.sleep(1.1)  # past tag_ttl
            assert await pull() == img.digest  # stale
            # ... and comes back hung: it accepts connections and never answers
            reg.start()
            before = upstream_requests(reg, MANIFESTS)
            reg.pause()
            try:
                await asyncio.sleep(1.1)  # past breaker_cooldown: the next request probes
                outcomes = [await pull("HEAD" if i % 2 else "GET") for i in range(20)]
                for _ in range(20):  # over a few more cycles of the (one) breaker
                    await asyncio.sleep(0.1)
                    outcomes.append(await pull())
            finally:
                reg.resume()
            assert outcomes == [img.digest] * 40
            # the registry now answers what queued up while it was stopped: one probe
            await _wait_for(lambda: upstream_requests(reg, MANIFESTS) > before, "the probe")
            await _wait_for(reg.ready, "the registry")
            assert upstream_requests(reg, MANIFESTS) - before == 1
    assert "Traceback" not in proxy.log_path.read_text()


@pytest.mark.timeout(20)
async def test_manifest_requests_give_up_after_header_timeout(aiohttp_server, tmp_path):
    """A manifest request whose upstream sends no headers gives up after header_timeout,
    not read_timeout; a blob whose body takes longer than that still arrives."""
    fake = FakeUpstream(manifest_delay=60.0, chunk_delay=0.05)
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "data", {"fake.io": up})
    cfg.upstreams["fake.io"] = UpstreamConfig(name="fake.io", url=up, read_timeout=60.0,
                                              header_timeout=0.5)
    base = str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")
    blob = os.urandom(1 << 20)  # 16 chunks, 0.8 s in all
    d = fake.add_blob(blob)
    async with aiohttp.ClientSession() as client:
        for method in ("HEAD", "GET"):
            async with client.request(method, f"{base}/v2/app/manifests/v1") as r:
                assert r.status == 503
        async with client.get(f"{base}/v2/app/blobs/{d}") as r:
            assert r.status == 200 and await r.read() == blob


def test_the_breaker_file_is_one_breaker_for_every_process(tmp_path):
    now = [1000.0]
    path = tmp_path / "breaker"
    a, b = (CircuitBreaker(threshold=2, cooldown=10, clock=lambda: now[0], path=path)
            for _ in range(2))
    a.failure()
    assert a.state is b.state is BreakerState.CLOSED and b.allow()
    a.failure()
    assert a.state is b.state is BreakerState.OPEN and not b.allow()
    now[0] += 11
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not a.allow() and not b.allow()  # one probe, whichever process
    b.failure()  # the probe failed: open again for everyone
    assert a.state is BreakerState.OPEN and not a.allow()
    now[0] += 11
    assert a.allow() and not b.allow()
    a.abandon()  # a probe that got no answer (cancelled) lets the next one through
    assert b.allow() and not a.allow()
    b.success()
    assert a.state is BreakerState.CLOSED and a.allow() and not path.exists()
