"""/metrics counters move as expected across hit, miss, coalesced and stale; health probes."""

from __future__ import annotations

import asyncio
import os

import aiohttp
from prometheus_client import REGISTRY

from proxy.app import create_app
from proxy.server import runner_kwargs
from proxy.stats import STATS
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import make_config
from tests.support.store import blob_path


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_follow_cache_outcomes(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "d", {"metrics.io": up}, tag_ttl=0.0)
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    blob = os.urandom(1 << 20)
    d = fake.add_blob(blob)
    fake.add_image("app", "v1", [b"layer"])
    fake.chunk_delay = 0.002
    before = {k: sample("regproxy_cache_requests_total", kind=kind, outcome=k.split(":")[1])
              for k in ("blob:miss", "blob:coalesced", "blob:hit", "manifest:miss",
                        "manifest:stale") for kind in [k.split(":")[0]]}
    served_cache = sample("regproxy_bytes_served_total", source="cache")
    served_up = sample("regproxy_bytes_served_total", source="upstream")
    up_bytes = sample("regproxy_upstream_bytes_total", upstream="metrics.io")
    async with aiohttp.ClientSession() as client:
        async def get(path: str) -> bytes:
            async with client.get(base + path) as r:
                assert r.status == 200, path
                return await r.read()

        await asyncio.gather(*(get(f"/v2/app/blobs/{d}") for _ in range(3)))  # 1 miss, 2 joined
        stored = blob_path(tmp_path / "d", d)
        for _ in range(100):  # clients finish at verification; the rename follows
            if stored.exists():
                break
            await asyncio.sleep(0.02)
        await get(f"/v2/app/blobs/{d}")  # hit
        await get("/v2/app/manifests/v1")  # miss
        fake.status = 503
        await get("/v2/app/manifests/v1")  # tag_ttl=0: revalidation fails -> stale
        async with client.get(f"{base}/metrics") as r:
            text = await r.text()
            assert r.headers["Content-Type"].startswith("text/plain")
        async with client.get(f"{base}/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with client.get(f"{base}/readyz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"

    def delta(key: str) -> float:
        kind, outcome = key.split(":")
        return sample("regproxy_cache_requests_total", kind=kind, outcome=outcome) - before[key]

    assert delta("blob:miss") == 1
    assert delta("blob:coalesced") == 2
    assert delta("blob:hit") == 1
    assert delta("manifest:miss") == 1
    assert delta("manifest:stale") == 1
    assert sample("regproxy_bytes_served_total", source="cache") - served_cache == len(blob)
    assert sample("regproxy_bytes_served_total", source="upstream") - served_up == 3 * len(blob)
    assert sample("regproxy_upstream_bytes_total", upstream="metrics.io") - up_bytes == len(blob)
    assert 'regproxy_upstream_requests_total{method="HEAD",status="503",upstream="metrics.io"}' in text
    assert "regproxy_upstream_latency_seconds_bucket" in text


async def test_status_page_renders_its_figures(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "d", {"status.io": up}, max_size=1 << 30)
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    fake.add_image("shown/repo", "v1", [os.urandom(5000)])
    STATS.bytes_by_repo.clear()  # the figures are per process: other tests served bytes too
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/v2/shown/repo/manifests/v1") as r:
            manifest = await r.json()
        layer = manifest["layers"][0]["digest"]
        for _ in range(3):
            async with client.get(f"{base}/v2/shown/repo/blobs/{layer}") as r:
                await r.read()
        async with client.get(f"{base}/status") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            page = await r.text()
        async with client.get(f"{base}/status.json") as r:
            snap = await r.json()
    assert "<h1>regproxy" in page and "status.io" in page and "<svg" in page
    assert "shown/repo" in page and "Hit ratio" in page
    assert snap["upstreams"][0]["breaker"] == "closed"
    assert dict(snap["top_repositories"]).get("shown/repo", 0) >= 3 * 5000  # stats are per process
    assert snap["outcomes"]["miss"] >= 2 and snap["outcomes"]["hit"] >= 1
    assert snap["cache"]["budget"] == 1 << 30


async def test_status_page_screenshot_in_headless_chromium(aiohttp_server, tmp_path):
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/install-test-deps.sh"
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "d", {"shot.io": up}, max_size=1 << 30)
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    png = tmp_path / "status.png"
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,1100",
        f"--screenshot={png}", str(server.make_url("/status")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000  # a real rendered page


def test_a_failing_increment_drops_only_itself_at_flush(caplog):
    """The tally is added per key: a bad label set is logged and the rest still counts."""
    from proxy import metrics

    metrics.flush()  # counts left by earlier tests' requests
    before = sample("regproxy_bytes_served_total", source="cache")
    metrics.count(metrics.BYTES_SERVED, "cache", "surplus-label", amount=5)
    metrics.count(metrics.BYTES_SERVED, "cache", amount=7)
    metrics.flush()
    assert sample("regproxy_bytes_served_total", source="cache") == before + 7
    assert "dropping 5" in caplog.text
    metrics.flush()  # the tally is empty afterwards
    assert sample("regproxy_bytes_served_total", source="cache") == before + 7


def test_access_log_counts_reach_metrics_and_stats_at_the_flush():
    """A request only bumps a pending entry; the flush turns it into the request, cache and
    bytes counters and the status page's statistics, with every request counted."""
    import logging

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web_urldispatcher import DynamicResource, ResourceRoute, UrlMappingMatchInfo

    from proxy import metrics
    from proxy.accesslog import AccessLogger
    from proxy.handlers.blobs import get_blob
    from proxy.handlers.common import CACHE_OUTCOME, REPO

    metrics.flush()  # counts left by earlier tests' requests
    route = ResourceRoute("GET", get_blob, DynamicResource("/v2/{name:.+}/blobs/{digest}"))
    request = make_mocked_request("GET", "/v2/tally/repo/blobs/sha256:x")
    request._match_info = UrlMappingMatchInfo({"name": "tally/repo"}, route)
    request[CACHE_OUTCOME], request[REPO] = "hit", "tally/repo"
    response = web.Response(body=b"x" * 100)
    response._body_length = 400  # what aiohttp counts once sent: header block included
    logger = AccessLogger(logging.getLogger("regproxy.access"), "")
    labels = {"route": "get_blob", "method": "GET", "status": "200"}
    before = (sample("regproxy_requests_total", **labels),
              sample("regproxy_cache_requests_total", kind="blob", outcome="hit"),
              sample("regproxy_bytes_served_total", source="cache"),
              STATS.bytes_by_repo["tally/repo"], STATS.totals()["hit"])
    for _ in range(3):
        logger.log(request, response, 0.001)
    assert sample("regproxy_requests_total", **labels) == before[0]  # not yet: batched
    metrics.flush()
    assert sample("regproxy_requests_total", **labels) == before[0] + 3
    assert sample("regproxy_cache_requests_total", kind="blob", outcome="hit") == before[1] + 3
    assert sample("regproxy_bytes_served_total", source="cache") == before[2] + 300
    assert STATS.bytes_by_repo["tally/repo"] == before[3] + 300
    assert STATS.totals()["hit"] == before[4] + 3
