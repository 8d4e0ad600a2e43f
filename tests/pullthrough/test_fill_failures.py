"""What a client sees of a fill that goes wrong: a range of a blob whose content fails
verification is never a complete 206; a full disk is a 503 that blames the disk, not the
upstream."""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import aiohttp
import pytest

from proxy.app import create_app
from proxy.config import PrefetchConfig
from proxy.storage import BlobWriter
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import make_config
from tests.support.store import tmp_files

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


def _full_disk(self: BlobWriter, chunks: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _check_logs(caplog: pytest.LogCaptureFixture, failures: int) -> None:
    """One line per failure that blames the disk; no traceback, no upstream failure."""
    full = [r for r in caplog.records if "disk is full" in r.getMessage()]
    assert len(full) == failures, [r.getMessage() for r in caplog.records]
    ours = [r for r in caplog.records if r.name.startswith("regproxy")]
    assert not [r for r in ours if r.exc_info or r.name == "regproxy.upstream"]


async def test_a_cold_manifest_on_a_full_disk_is_a_503(fake, workers, monkeypatch, caplog):
    a, _ = workers
    digests = [fake.add_image("app", f"v{i}", [b"layer %d" % i]) for i in range(4)]
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(BlobWriter, "write_many", _full_disk)
    async with aiohttp.ClientSession() as client:
        for i in range(3):  # as many as would open the breaker if they counted
            async with client.get(f"{a}/v2/app/manifests/v{i}") as r:
                assert r.status == 503
                error = (await r.json())["errors"][0]
                assert error["code"] == "UNAVAILABLE" and "disk is full" in error["message"]
        monkeypatch.undo()
        async with client.get(f"{a}/v2/app/manifests/v3") as r:
            assert r.status == 200 and r.headers["Docker-Content-Digest"] == digests[3]
    _check_logs(caplog, 3)


@pytest.mark.parametrize("size", [100_000, 9 * MiB])  # written inline / by the tee's thread
async def test_a_fill_on_a_full_disk_is_a_503_not_an_upstream_failure(
        fake, workers, monkeypatch, caplog, tmp_path, size):
    a, _ = workers
    fake.chunk_delay = 0.0
    blobs = [os.urandom(size) for _ in range(4)]
    digests = [fake.add_blob(blob) for blob in blobs]
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(BlobWriter, "write_many", _full_disk)
    async with aiohttp.ClientSession() as client:
        for d in digests[:3]:
            async with client.get(f"{a}/v2/app/blobs/{d}") as r:
                assert r.status == 503
                error = (await r.json())["errors"][0]
                assert error["code"] == "UNAVAILABLE" and "disk is full" in error["message"]
        monkeypatch.undo()
        async with client.get(f"{a}/v2/app/blobs/{digests[3]}") as r:
            assert r.status == 200 and await r.read() == blobs[3]
    _check_logs(caplog, 3)
    left = tmp_files(tmp_path / "data")  # (the last fill may still be publishing)
    assert not [name for name in left for d in digests[:3] if d[7:] in name]


async def test_a_background_revalidation_on_a_full_disk_logs_one_line(
        aiohttp_server, fake, monkeypatch, caplog, tmp_path):
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "data", {"fake.io": up}, tag_ttl=0.2,
                      tag_stale_while_revalidate=60.0,
                      prefetch=PrefetchConfig(enabled=False))  # (its fills would log too)
    base = str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")
    old = fake.add_image("app", "v1", [b"old"])
    caplog.set_level(logging.INFO)
    async with aiohttp.ClientSession() as client:
        async def pull() -> str:
            async with client.get(f"{base}/v2/app/manifests/v1") as r:
                assert r.status == 200
                return r.headers["Docker-Content-Digest"]

        assert await pull() == old
        fake.add_image("app", "v1", [b"new"])  # the tag moves upstream ...
        monkeypatch.setattr(BlobWriter, "write_many", _full_disk)  # ... and the disk fills
        await asyncio.sleep(0.3)  # past tag_ttl
        assert await pull() == old  # answered at once; the new manifest cannot be stored
        for _ in range(100):
            if any("disk is full" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    _check_logs(caplog, 1)
