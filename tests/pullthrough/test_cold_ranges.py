"""Cold ranges: a Range GET far beyond what a running fill has written streams from its own
upstream ranged GET at once, while the one full fill goes on; its last byte waits for the
verified blob unless the upstream has ``unverified_ranges``. Against the real registry,
and the fault-injecting fake (a full GET stalled mid-body, corrupt blobs and ranges)."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from proxy import metrics
from proxy.app import create_app
from proxy.config import Config
from proxy.pullthrough.fill import COLD_RANGE_LEAD, COLD_RANGE_MAX
from proxy.settings.fields import ConfigError
from proxy.settings.upstreams import parse_upstream
from tests.support.counters import counter
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import push_blob
from tests.support.proxyfix import make_config, serve_app, with_upstream_fields
from tests.support.registry import upstream_gets
from tests.support.store import is_stored, tmp_files, wait_stored, wait_until

MiB = 1 << 20
SIZE = 16 * MiB + 12345
START, LENGTH = SIZE - 2 * MiB, 256 * 1024  #: a range near the end
STALL = 1 * MiB  #: where the fake holds the full GET's body until told to go on


def cold_config(data: Path, upstreams: dict[str, str], **upstream_overrides: object) -> Config:
    """One stream per fill (so the fake's stall holds the whole fill back)."""
    return with_upstream_fields(make_config(data, upstreams), parallel_fills=1,
                                **upstream_overrides)


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(ranges=True, stall_after=STALL)


async def start_proxy(aiohttp_server, upstream_url: str, tmp_path: Path, **overrides: object
                      ) -> tuple[str, Path]:
    """A proxy on the fake (one stream per fill), and its data directory."""
    data = tmp_path / "data"
    return await serve_app(aiohttp_server, create_app(
        cold_config(data, {"fake.io": upstream_url}, **overrides))), data


def range_header(start: int = START, length: int = LENGTH) -> dict[str, str]:
    return {"Range": f"bytes={start}-{start + length - 1}"}


def test_unverified_ranges_is_off_by_default_and_named_in_errors():
    assert parse_upstream("ghcr.io", {"url": "https://ghcr.io"}).unverified_ranges is False
    up = parse_upstream("ghcr.io", {"url": "https://ghcr.io", "unverified_ranges": True})
    assert up.unverified_ranges is True
    with pytest.raises(ConfigError, match=r"upstreams\.\"?ghcr\.io\"?\.unverified_ranges"):
        parse_upstream("ghcr.io", {"url": "https://ghcr.io", "unverified_ranges": "yes"})


async def test_a_cold_range_streams_before_the_fill_reaches_it_and_ends_after_verification(
        fake, upstream_url, aiohttp_server, tmp_path, client):
    base, data = await start_proxy(aiohttp_server, upstream_url, tmp_path)
    blob = os.urandom(SIZE)
    d = fake.add_blob(blob)
    verified_before = counter(metrics.UPSTREAM_BYTES, "fake.io")
    async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header()) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes {START}-{START + LENGTH - 1}/{SIZE}"
        # every byte but the last comes while the full GET is held at 1 MiB
        head = await r.content.readexactly(LENGTH - 1)
        assert head == blob[START:START + LENGTH - 1]
        assert fake.count("GET", d) == 2 and d not in fake.sent_all
        assert counter(metrics.UPSTREAM_BYTES, "fake.io") == verified_before  # not verified
        fake.resume.set()
        last = await r.content.read()
        # the last byte comes only once the whole blob is verified (counted just then)
        assert counter(metrics.UPSTREAM_BYTES, "fake.io") - verified_before == SIZE
    assert last == blob[START + LENGTH - 1:START + LENGTH]
    await wait_stored(data, d)
    assert fake.blob_ranges(d) == ["", f"bytes={START}-{START + LENGTH - 2}"]  # one full fill
    await wait_until(lambda: tmp_files(data) == [], "the fill's hint files to go")  # (after the rename)


async def test_a_corrupt_blob_cuts_the_cold_range_before_its_last_byte(
        fake, upstream_url, aiohttp_server, tmp_path, client):
    base, data = await start_proxy(aiohttp_server, upstream_url, tmp_path)
    blob = os.urandom(SIZE)
    d = fake.add_blob(blob)
    fake.corrupt = True  # the full GET's first byte is flipped: the fill fails verification
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header()) as r:
            assert r.status == 206
            received = await r.content.readexactly(LENGTH - 1)
            fake.resume.set()
            received += await r.content.read()
    assert received == blob[START:START + LENGTH - 1]  # (the range itself was intact)
    await wait_until(lambda: tmp_files(data) == [], "the fill's temp files to go")
    assert not is_stored(data, d)
    assert fake.blob_ranges(d).count("") == 1


async def test_range_bytes_other_than_the_verified_blob_cut_the_response(
        fake, upstream_url, aiohttp_server, tmp_path, client):
    base, data = await start_proxy(aiohttp_server, upstream_url, tmp_path)
    blob = os.urandom(SIZE)
    d = fake.add_blob(blob)
    fake.corrupt_ranges = True  # the blob is good, the ranged answer is not
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header()) as r:
            received = await r.content.readexactly(LENGTH - 1)
            fake.resume.set()
            received += await r.content.read()
    assert len(received) == LENGTH - 1
    await wait_stored(data, d)  # the fill itself was good
    assert fake.blob_ranges(d).count("") == 1


async def test_unverified_ranges_complete_before_the_fill_ends(
        fake, upstream_url, aiohttp_server, tmp_path, client):
    base, data = await start_proxy(aiohttp_server, upstream_url, tmp_path, unverified_ranges=True)
    blob = os.urandom(SIZE)
    d = fake.add_blob(blob)
    cold_before = counter(metrics.COLD_RANGES, "fake.io")
    async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header()) as r:
        assert r.status == 206
        body = await r.read()  # whole, while the full GET is still held at 1 MiB
    assert body == blob[START:START + LENGTH]
    assert d not in fake.sent_all and not is_stored(data, d)
    assert counter(metrics.COLD_RANGES, "fake.io") - cold_before == 1
    fake.resume.set()
    await wait_stored(data, d)
    assert fake.blob_ranges(d) == ["", f"bytes={START}-{START + LENGTH - 1}"]  # one full fill
    async with client.get(f"{base}/v2/a/blobs/{d}") as r:
        assert await r.read() == blob


async def test_a_range_near_the_fill_waits_for_it_and_asks_no_range(
        fake, upstream_url, aiohttp_server, tmp_path, client):
    base, data = await start_proxy(aiohttp_server, upstream_url, tmp_path)
    fake.stall_after = None
    blob = os.urandom(SIZE)
    d = fake.add_blob(blob)
    start = COLD_RANGE_LEAD // 4
    async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header(start)) as r:
        assert r.status == 206 and await r.read() == blob[start:start + LENGTH]
    await wait_stored(data, d)
    assert fake.blob_ranges(d) == [""]


async def test_long_ranges_and_upstreams_without_ranges_wait_for_the_fill(
        fake, upstream_url, aiohttp_server, tmp_path, client):
    """The rest of a blob (a resumed download) is not fetched twice; an upstream that
    announces no ranges is not asked for one."""
    base, data = await start_proxy(aiohttp_server, upstream_url, tmp_path)
    fake.stall_after = None
    size = COLD_RANGE_MAX + 8 * MiB
    blob = os.urandom(size)
    d = fake.add_blob(blob)
    start = size - COLD_RANGE_MAX - 1
    async with client.get(f"{base}/v2/a/blobs/{d}", headers={"Range": f"bytes={start}-"}) as r:
        assert r.status == 206 and await r.read() == blob[start:]
    await wait_stored(data, d)
    assert fake.blob_ranges(d) == [""]
    fake.ranges = False  # no Accept-Ranges
    blob = os.urandom(SIZE)
    d = fake.add_blob(blob)
    async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header()) as r:
        assert r.status == 206 and await r.read() == blob[START:START + LENGTH]
    await wait_stored(data, d)
    assert fake.blob_ranges(d) == [""]


async def test_an_upstream_ignoring_the_range_leaves_it_to_the_fill(
        fake, upstream_url, aiohttp_server, tmp_path, client):
    base, data = await start_proxy(aiohttp_server, upstream_url, tmp_path, unverified_ranges=True)
    fake.ranges, fake.ignore_ranges, fake.stall_after = False, True, None
    blob = os.urandom(SIZE)
    d = fake.add_blob(blob)
    async with client.get(f"{base}/v2/a/blobs/{d}", headers=range_header()) as r:
        assert r.status == 206 and await r.read() == blob[START:START + LENGTH]
    await wait_stored(data, d)
    assert fake.blob_ranges(d).count("") == 1


async def test_a_cold_range_from_the_real_registry_during_a_ranged_fill(
        upstream_registry, aiohttp_server, tmp_path, http_session):
    """40 MiB pushed to docker-registry, filled with 4 ranged GETs (the defaults): a range
    near its end asked at once gets the right bytes from one more ranged GET, the fill
    stays one (4 GETs), and the blob is stored."""
    blob = os.urandom(40 * MiB + 777)
    desc = await push_blob(http_session, upstream_registry.url, "cold/big", blob)
    cfg = make_config(tmp_path / "data", {"reg.io": upstream_registry.url})
    base = await serve_app(aiohttp_server, create_app(cfg))
    cold_before = counter(metrics.COLD_RANGES, "reg.io")
    parts_before = counter(metrics.RANGED_PARTS, "reg.io")
    start = len(blob) - 3 * MiB
    async with http_session.get(f"{base}/v2/cold/big/blobs/{desc.digest}",
                                headers=range_header(start, MiB)) as r:
        assert r.status == 206 and await r.read() == blob[start:start + MiB]
    await wait_stored(tmp_path / "data", desc.digest)
    assert counter(metrics.COLD_RANGES, "reg.io") - cold_before == 1
    assert counter(metrics.RANGED_PARTS, "reg.io") - parts_before == 3  # the fill's own
    assert upstream_gets(upstream_registry, f"/blobs/{desc.digest}") == 5
