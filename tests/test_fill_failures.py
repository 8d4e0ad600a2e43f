"""What a client sees of a fill that goes wrong: a range of a blob whose content fails
verification is never a complete 206."""

from __future__ import annotations

import os

import aiohttp
import pytest

from proxy.app import create_app
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import make_config

MiB = 1 << 20
RANGES = ["bytes=0-100000", "bytes=1000000-1999999", "bytes=5-5"]


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(chunk_delay=0.003)  # 3 MiB: the fill runs for a while


@pytest.fixture
async def workers(aiohttp_server, fake, tmp_path) -> tuple[str, str]:
    """Two proxies on one store, as two worker processes are: the second tails the
    first's fills."""
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "data", {"fake.io": up})
    a = await aiohttp_server(create_app(cfg))
    b = await aiohttp_server(create_app(cfg, clean_tmp=False))
    return str(a.make_url("")).rstrip("/"), str(b.make_url("")).rstrip("/")


async def _range(client: aiohttp.ClientSession, url: str, rng: str) -> bytes:
    async with client.get(url, headers={"Range": rng}) as r:
        assert r.status == 206
        return await r.read()


@pytest.mark.parametrize("rng", RANGES)
async def test_a_range_of_a_corrupt_blob_is_cut_not_completed(fake, workers, rng):
    a, b = workers
    blob = os.urandom(3 * MiB)
    d = fake.add_blob(blob)
    fake.corrupt = True  # the first byte flipped: the digest check at the end fails
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            await _range(client, f"{a}/v2/app/blobs/{d}", rng)  # starts the fill
        fill = await client.get(f"{a}/v2/app/blobs/{d}")  # another fill, a worker tails it
        try:
            await fill.content.readexactly(64 * 1024)
            with pytest.raises(aiohttp.ClientPayloadError):
                await _range(client, f"{b}/v2/app/blobs/{d}", rng)
        finally:
            fill.close()


@pytest.mark.parametrize("rng", RANGES)
async def test_ranges_of_a_good_filling_blob_arrive_whole(fake, workers, rng):
    a, b = workers
    blob = os.urandom(3 * MiB)
    d = fake.add_blob(blob)
    first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
    async with aiohttp.ClientSession() as client:
        fill = await client.get(f"{a}/v2/app/blobs/{d}")
        await fill.content.readexactly(64 * 1024)
        parts = [await _range(client, f"{base}/v2/app/blobs/{d}", rng) for base in (a, b)]
        assert len(await fill.read()) == len(blob) - 64 * 1024
    assert parts == [blob[first:last + 1]] * 2
    assert fake.count("GET", f"/blobs/{d}") == 1
