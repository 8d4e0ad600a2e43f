"""/metrics and the status page of a real ``regproxy serve --workers 2``: whichever worker
answers, they count every worker's requests."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.images import push_image
from tests.support.proxyproc import ProxyProcess
from tests.support.store import blob_path

MANIFEST_GETS = 30
BLOB_GETS = 20
T = TypeVar("T")


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for have, v in samples(text, name) if labels.items() <= have.items())


async def fresh_get(url: str, *, json: bool = False) -> Any:
    """One request on a connection of its own: SO_REUSEPORT spreads connections over the
    workers, so such requests land on both."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client, client.get(url) as r:
        assert r.status == 200, (url, r.status)
        return await r.json() if json else await r.read()


async def wait_for(what: str, fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool],
                   within: float = 15.0) -> T:
    """Poll ``fetch()`` until ``done`` says yes (each worker adds its requests to the shared
    figures within a second)."""
    deadline = time.monotonic() + within
    while True:
        last = await fetch()
        if done(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached; last {str(last)[:3000]}")
        await asyncio.sleep(0.1)


def worker_pids(metrics_dir: Path) -> set[int]:
    return {int(m.group(1)) for p in metrics_dir.iterdir()
            if (m := re.search(r"_(\d+)\.db$", p.name))}


async def test_metrics_and_status_count_every_workers_requests(
    upstream_registry, http_session, tmp_path
):
    img = await push_image(http_session, upstream_registry.url, "it/twoworkers", "v1",
                           [b"layer-of-two-workers" * 100], schema="oci")
    layer = img.layers[0]
    data = tmp_path / "data"
    config = tmp_path / "no-prefetch.toml"  # the blob's first GET is its miss (not a join)
    config.write_text('[cache]\nprefetch = "off"\n')
    with ProxyProcess(tmp_path / "p", "--config", str(config), "--upstream",
                      upstream_registry.url, "--workers", "2", "--data-dir", str(data)) as proxy:
        base = f"{proxy.url}/v2/it/twoworkers"
        await fresh_get(f"{base}/manifests/v1")  # the misses: then every other read is a hit
        await fresh_get(f"{base}/blobs/{layer.digest}")
        stored = blob_path(data, layer.digest)

        async def blob_stored() -> bool:
            return stored.exists()

        await wait_for("the blob stored", blob_stored, bool)
        for _ in range(MANIFEST_GETS - 1):
            await fresh_get(f"{base}/manifests/v1")
        for _ in range(BLOB_GETS - 1):
            await fresh_get(f"{base}/blobs/{layer.digest}")

        async def scrape() -> str:
            return (await fresh_get(f"{proxy.url}/metrics")).decode()

        text = await wait_for("/metrics counting every read", scrape, lambda text: total(
            text, "regproxy_cache_requests_total") == MANIFEST_GETS + BLOB_GETS)
        assert total(text, "regproxy_requests_total", route="get_manifest") == MANIFEST_GETS
        assert total(text, "regproxy_requests_total", route="get_blob") == BLOB_GETS
        assert total(text, "regproxy_cache_requests_total", kind="manifest",
                     outcome="miss") == 1
        assert total(text, "regproxy_cache_requests_total", kind="blob",
                     outcome="hit") == BLOB_GETS - 1
        assert total(text, "regproxy_bytes_served_total") == BLOB_GETS * layer.size

        async def status() -> dict[str, Any]:
            return await fresh_get(f"{proxy.url}/status.json", json=True)

        answering: set[int] = set()
        while len(answering) < 2:  # reloads until both workers' pages were seen
            snap = await wait_for("/status.json counting every read", status, lambda snap: sum(
                snap["outcomes"].values()) == MANIFEST_GETS + BLOB_GETS)
            answering.add(snap["pid"])
            assert snap["outcomes"] == {"miss": 2, "hit": MANIFEST_GETS + BLOB_GETS - 2}
            assert len(snap["workers"]) == 2
            assert all(w["cache_reads"] > 0 for w in snap["workers"])  # both answered reads
            # ... and both keep their samples in files of their own
            assert {w["pid"] for w in snap["workers"]} <= worker_pids(data / "metrics")
            assert sum(w["cache_reads"] for w in snap["workers"]) == MANIFEST_GETS + BLOB_GETS
            assert dict(snap["top_repositories"]) == {
                "it/twoworkers": MANIFEST_GETS * len(img.manifest) + BLOB_GETS * layer.size}
            assert snap["hit_ratio"] == (MANIFEST_GETS + BLOB_GETS - 2) / (MANIFEST_GETS + BLOB_GETS)
            minute_reads = sum(1 for _, r in snap["hit_ratio_series"] if r is not None)
            assert minute_reads >= 1
        page = (await fresh_get(f"{proxy.url}/status")).decode()
        assert "2 workers" in page
