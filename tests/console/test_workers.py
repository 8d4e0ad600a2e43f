"""The console's figures of a real ``regproxy serve --workers 2``: whichever worker
answers, the overview's series and totals count every worker's requests."""

from __future__ import annotations

from typing import Any

from tests.ops.test_metrics_workers import fresh_get, wait_for
from tests.support.images import push_image
from tests.support.proxyproc import ProxyProcess
from tests.support.store import blob_path

GETS = 24
#: The other workers publish their series every 10 s (proxy.workerstatus.SERIES_INTERVAL).
PATIENCE = 40.0


async def test_overview_counts_every_workers_requests(upstream_registry, http_session, tmp_path):
    img = await push_image(http_session, upstream_registry.url, "it/console-workers", "v1",
                           [b"layer of the console's workers" * 300], schema="oci")
    layer = img.layers[0]
    data = tmp_path / "data"
    with ProxyProcess(tmp_path / "p", "--upstream", upstream_registry.url, "--workers", "2",
                      "--data-dir", str(data)) as proxy:
        blob = f"{proxy.url}/v2/it/console-workers/blobs/{layer.digest}"
        await fresh_get(blob)  # the miss; every later read is a hit

        async def stored() -> bool:
            return blob_path(data, layer.digest).exists()

        await wait_for("the blob stored", stored, bool)
        for _ in range(GETS - 1):
            await fresh_get(blob)

        async def overview() -> dict[str, Any]:
            return await fresh_get(f"{proxy.url}/_regproxy/api/overview?window=15m", json=True)

        answering: set[int] = set()
        while len(answering) < 2:  # reloads until both workers answered
            view = await wait_for("the overview counting every read", overview,
                                  lambda v: v["totals"]["hits"] + v["totals"]["misses"] == GETS,
                                  within=PATIENCE)
            answering.add(view["workers"][0]["pid"])
            totals = view["totals"]
            assert len(view["workers"]) == 2
            assert totals["hits"] == GETS - 1 and totals["misses"] == 1
            assert totals["requests"] >= GETS  # (and the start-up check's GET /v2/)
            assert totals["bytes_cache"] == (GETS - 1) * layer.size
            assert totals["bytes_upstream"] == layer.size == totals["upstream_bytes"]
            assert sum(view["series"]["requests_per_second"]) > 0
        ups = await fresh_get(f"{proxy.url}/_regproxy/api/upstreams", json=True)
        default = next(u for u in ups["upstreams"] if u["default"])
        assert default["state"] == "healthy" and default["requests_by_status"].get("200", 0) >= 1
