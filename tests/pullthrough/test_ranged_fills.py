"""Parallel ranged fills: a big blob fetched as several ranged GETs at once, written at
their offsets, hashed in order, tailed by joiners up to the contiguous prefix only; against
the real registry, and the fault-injecting fake for retries, ignored ranges, corruption and
CDN redirects."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy import metrics
from proxy.app import create_app
from proxy.config import Config
from proxy.pullthrough.fill import TailReader
from proxy.reference import Digest
from proxy.settings.fields import ConfigError
from proxy.settings.prefetch import PrefetchConfig
from proxy.settings.upstreams import parse_upstream
from proxy.storage.backend import open_filesystem
from tests.support.counters import counter
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.images import push_blob
from tests.support.proxyfix import make_config, serve_app, with_upstream_fields
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import upstream_gets
from tests.support.store import is_stored, tmp_files, wait_stored, wait_until

MiB = 1 << 20


def ranged_config(data: Path, upstreams: dict[str, str], *, parts: int = 4,
                  threshold: int = 2 * MiB, **upstream_overrides: object) -> Config:
    return with_upstream_fields(make_config(data, upstreams), parallel_fills=parts,
                                parallel_fill_threshold=threshold, **upstream_overrides)


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(ranges=True)


@pytest.fixture
async def proxy(aiohttp_server, upstream_url, tmp_path):
    """A proxy with layer prefetch off (a fill starts at a client's blob GET)."""
    data = tmp_path / "data"
    cfg = replace(ranged_config(data, {"fake.io": upstream_url}),
                  prefetch=PrefetchConfig(enabled=False))
    return await serve_app(aiohttp_server, create_app(cfg)), data


@pytest.fixture
async def prefetching(aiohttp_server, upstream_url, tmp_path):
    """A proxy with layer prefetch on (the default)."""
    data = tmp_path / "data"
    return await serve_app(aiohttp_server,
                           create_app(ranged_config(data, {"fake.io": upstream_url}))), data


async def linked(fake: FakeUpstream, base: str, client: aiohttp.ClientSession, blob: bytes
                 ) -> str:
    """Put ``blob`` in an image ``team/app:v1`` on the fake and GET its manifest through
    the proxy (prefetch off): the repository then holds a link to the blob, so a blob GET
    needs no HEAD upstream and its fill knows no size before its first GET (a plain GET,
    which tells it). A blob GET with no link is confirmed by a HEAD, whose size makes every
    GET of the fill ranged."""
    fake.add_image("team/app", "v1", [blob])
    async with client.get(f"{base}/v2/team/app/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
        assert r.status == 200
    return digest_of(blob)


def spans_of(size: int, parts: int = 4, start: int = 0) -> list[str]:
    step = -(-size // parts)
    return [f"bytes={s}-{min(size, s + step) - 1}" for s in range(start, size, step)]


# -- configuration -------------------------------------------------------------------


def test_parallel_fill_settings_parse_sizes_and_name_the_key():
    up = parse_upstream("ghcr.io", {"url": "https://ghcr.io"})
    assert (up.parallel_fills, up.parallel_fill_threshold) == (4, 32 * MiB)
    up = parse_upstream("ghcr.io", {"url": "https://ghcr.io", "parallel_fills": 1,
                                    "parallel_fill_threshold": "64MiB"})
    assert (up.parallel_fills, up.parallel_fill_threshold) == (1, 64 * MiB)
    for key, value in (("parallel_fills", 0), ("parallel_fills", 17),
                       ("parallel_fill_threshold", "lots")):
        with pytest.raises(ConfigError) as err:
            parse_upstream("ghcr.io", {"url": "https://ghcr.io", key: value})
        assert f"upstreams.ghcr.io.{key}" in str(err.value)


# -- the real registry ---------------------------------------------------------------


async def test_a_big_blob_from_the_real_registry_is_filled_with_ranged_gets_and_tailed(
        upstream_registry, aiohttp_server, tmp_path, http_session):
    """40 MiB pushed to docker-registry: four GETs upstream (all ranged: the HEAD that
    confirms the repository holds it told the size), two
    clients (the second joins the running fill) get identical bytes, and it is stored."""
    blob = os.urandom(40 * MiB + 12345)
    desc = await push_blob(http_session, upstream_registry.url, "ranged/big", blob)
    cfg = make_config(tmp_path / "data", {"reg.io": upstream_registry.url})  # defaults: 4, 32MiB
    base = await serve_app(aiohttp_server, create_app(cfg))
    before = counter(metrics.RANGED_PARTS, "reg.io")
    url = f"{base}/v2/ranged/big/blobs/{desc.digest}"

    async def pull() -> bytes:
        async with http_session.get(url) as r:
            assert r.status == 200
            h = hashlib.sha256()
            first = await r.content.read(1)
            h.update(first)
            async for chunk in r.content.iter_any():
                h.update(chunk)
            return h.digest()

    first = asyncio.ensure_future(pull())
    second = asyncio.ensure_future(pull())
    sums = await asyncio.gather(first, second)
    assert sums == [hashlib.sha256(blob).digest()] * 2
    await wait_stored(tmp_path / "data", desc.digest)
    assert upstream_gets(upstream_registry, f"/blobs/{desc.digest}") == 4
    assert counter(metrics.RANGED_PARTS, "reg.io") - before == 3
    await wait_until(lambda: tmp_files(tmp_path / "data") == [], "the fill's hint files to go")


async def test_sibling_workers_tail_a_ranged_fill_and_get_identical_bytes(
        upstream_registry, tmp_path, http_session):
    """Two worker processes: clients landing on the worker that does not fill tail the
    other's file, which grows out of order, through its announced prefix."""
    blob = os.urandom(48 * MiB + 99)
    desc = await push_blob(http_session, upstream_registry.url, "ranged/workers", blob)
    want = hashlib.sha256(blob).hexdigest()
    with ProxyProcess(tmp_path / "p", "--upstream", upstream_registry.url, "--workers", "2",
                      "--data-dir", str(tmp_path / "data")) as proxy:
        procs = await asyncio.gather(*(
            asyncio.create_subprocess_shell(
                f"curl -s --fail {proxy.url}/v2/ranged/workers/blobs/{desc.digest}"
                " | sha256sum", stdout=subprocess.PIPE)
            for _ in range(8)))
        outs = [(await p.communicate())[0].decode().split()[0] for p in procs]
        await wait_stored(tmp_path / "data", desc.digest)
    assert outs == [want] * 8
    assert upstream_gets(upstream_registry, f"/blobs/{desc.digest}") == 4


# -- the fake: parts, retries, fallbacks, corruption, redirects ----------------------


async def test_parts_are_ranged_gets_and_a_joiner_sees_every_byte_in_order(fake, proxy, client):
    """A linked blob: the first GET is plain (it tells the size), the other parts ranged."""
    base, data = proxy
    fake.chunk_delay = 0.001  # keep the fill running while the joiner comes
    blob = os.urandom(6 * MiB + 7)
    d = await linked(fake, base, client, blob)

    async def pull() -> bytes:
        async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
            assert r.status == 200
            return await r.read()

    bodies = await asyncio.gather(pull(), pull())
    assert bodies == [blob, blob]
    await wait_stored(data, d)
    assert sorted(fake.blob_ranges(d)) == sorted(["", *spans_of(len(blob))[1:]])
    assert fake.count("HEAD", f"/blobs/{d}") == 0
    await wait_until(lambda: tmp_files(data) == [], "the fill's hint files to go")


async def test_a_blob_get_confirmed_by_a_head_asks_only_ranges(fake, proxy, client):
    """No link yet: the HEAD that confirms the repository holds the blob tells its size, so
    the first GET asks for part 0 only and no byte past it is sent for nothing."""
    base, data = proxy
    blob = os.urandom(6 * MiB + 7)
    d = fake.add_blob(blob)
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    await wait_stored(data, d)
    assert fake.count("HEAD", f"/blobs/{d}") == 1
    assert sorted(fake.blob_ranges(d)) == sorted(spans_of(len(blob)))


async def test_a_failed_part_is_asked_again_from_where_it_stopped(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(6 * MiB)
    d = fake.add_blob(blob)
    fake.fail_ranges = 1
    before = counter(metrics.RANGED_RETRIES, "fake.io")
    async with client.get(f"{base}/v2/a/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    await wait_stored(data, d)
    gets = fake.blob_ranges(d)
    assert len(gets) == 5  # the first GET, three parts, one of them asked again
    assert counter(metrics.RANGED_RETRIES, "fake.io") - before == 1


async def test_a_first_get_cut_short_is_resumed_with_a_range(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(6 * MiB)
    d = await linked(fake, base, client, blob)
    fake.die_after = 512 * 1024  # (the plain GET only)
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    await wait_stored(data, d)
    assert f"bytes={512 * 1024}-{-(-len(blob) // 4) - 1}" in fake.blob_ranges(d)


async def test_a_part_failing_every_time_fails_the_fill_cleanly(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(6 * MiB)
    d = fake.add_blob(blob)
    fake.fail_ranges = 1000
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/v2/a/blobs/{d}") as r:
            await r.read()
    await wait_until(lambda: tmp_files(data) == [], "the fill's temp files to go")
    assert not is_stored(data, d)


async def test_an_upstream_ignoring_ranges_falls_back_to_one_stream(fake, proxy, client):
    base, data = proxy
    fake.ranges, fake.ignore_ranges = False, True  # Accept-Ranges: bytes, yet 200s
    blob = os.urandom(6 * MiB + 3)
    d = fake.add_blob(blob)
    before = counter(metrics.RANGED_FALLBACKS, "fake.io")
    async with client.get(f"{base}/v2/a/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    await wait_stored(data, d)
    assert counter(metrics.RANGED_FALLBACKS, "fake.io") - before == 1
    await wait_until(lambda: tmp_files(data) == [], "the fill's hint files to go")


async def test_an_upstream_without_accept_ranges_gets_one_plain_get(fake, proxy, client):
    base, data = proxy
    fake.ranges = False
    blob = os.urandom(6 * MiB)
    d = await linked(fake, base, client, blob)
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    await wait_stored(data, d)
    assert fake.blob_ranges(d) == [""]
    other = os.urandom(6 * MiB)  # no link: the first GET asks a range, answered 200: one stream
    d2 = fake.add_blob(other)
    async with client.get(f"{base}/v2/team/app/blobs/{d2}") as r:
        assert r.status == 200 and await r.read() == other
    await wait_stored(data, d2)
    assert fake.blob_ranges(d2) == spans_of(len(other))[:1]


async def test_a_corrupt_part_fails_the_fill_before_the_last_byte(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(6 * MiB)
    d = fake.add_blob(blob)
    fake.corrupt_ranges = True
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/v2/a/blobs/{d}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += len(chunk)
    assert received < len(blob)
    await wait_until(lambda: tmp_files(data) == [], "the fill's temp files to go")
    assert not is_stored(data, d)


async def test_ranges_follow_a_redirect_to_a_cdn_without_credentials(aiohttp_server, fake,
                                                                      tmp_path, client):
    cdn = FakeUpstream(ranges=True)
    cdn_url = await serve_app(aiohttp_server, cdn.app())
    fake.require_basic = "user:pw"
    fake.redirect_to = cdn_url
    origin = await serve_app(aiohttp_server, fake.app())
    cfg = ranged_config(tmp_path / "d", {"fake.io": origin}, username="user", password="pw")
    base = await serve_app(aiohttp_server, create_app(cfg))
    blob = os.urandom(6 * MiB + 1)
    d = fake.add_blob(blob)
    cdn.add_blob(blob)
    async with client.get(f"{base}/v2/a/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    await wait_stored(tmp_path / "d", d)
    at_cdn = [x for x in cdn.requests if x.method == "GET"]
    assert sorted(bool(x.headers.get("Range")) for x in at_cdn) == [True] * 4  # (HEAD: size)
    assert all("Authorization" not in x.headers for x in cdn.requests)
    assert any(x.headers.get("Authorization", "").startswith("Basic ")  # (after a 401)
               for x in fake.requests if "/blobs/" in x.path)


# -- a size known before the first GET (a prefetch, from the manifest) ---------------


async def prefetch_image(fake: FakeUpstream, base: str, client: aiohttp.ClientSession,
                         data: Path, layer: bytes, *, size_error: int = 0) -> str:
    """Put an image of one layer on the fake, GET its manifest through the proxy (layer
    prefetch is on by default) and wait until the prefetch stored the layer.
    ``size_error``: the descriptor's size is off by that much (a manifest that lies)."""
    fake.add_image("team/app", "v1", [layer], size_error=size_error)
    d = digest_of(layer)
    async with client.get(f"{base}/v2/team/app/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
        assert r.status == 200
    await wait_stored(data, d)
    return d


async def test_a_prefetched_big_blob_asks_only_ranges_so_no_byte_comes_twice(
        fake, prefetching, client):
    """The manifest gave the layer's size: the fill's first GET asks for part 0 only (a
    plain GET would still have bytes past part 0 in flight when it stops, which the
    upstream sends and bills for nothing), and the parts cover the blob exactly once."""
    base, data = prefetching
    layer = os.urandom(6 * MiB + 5)
    d = await prefetch_image(fake, base, client, data, layer)
    step = -(-len(layer) // 4)
    spans = [f"bytes={s}-{min(len(layer), s + step) - 1}" for s in range(0, len(layer), step)]
    assert sorted(fake.blob_ranges(d)) == sorted(spans)
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == layer
    assert len(fake.blob_ranges(d)) == 4  # (served from the store)


async def test_a_prefetched_blob_from_an_upstream_ignoring_ranges_is_one_stream(
        fake, prefetching, client):
    base, data = prefetching
    fake.ranges, fake.ignore_ranges = False, True  # the ranged first GET is answered 200
    layer = os.urandom(6 * MiB)
    d = await prefetch_image(fake, base, client, data, layer)
    assert fake.blob_ranges(d) == [f"bytes=0-{-(-len(layer) // 4) - 1}"]
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == layer


async def test_a_size_known_wrongly_before_the_first_get_is_asked_again_plainly(
        fake, prefetching, client):
    """The size known before the first GET was wrong (here a manifest descriptor one byte
    too big; a HEAD can lie the same way): the upstream's 206 names the real size, so the
    fill asks again with a plain GET and the bytes decide (digest and size checked)."""
    base, data = prefetching
    layer = os.urandom(6 * MiB)
    d = await prefetch_image(fake, base, client, data, layer, size_error=1)
    gets = fake.blob_ranges(d)  # the wrong first range, then a plain GET and its 3 parts
    assert gets[:2] == [spans_of(len(layer) + 1)[0], ""]
    assert sorted(gets[2:]) == sorted(spans_of(len(layer))[1:])
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == layer


# -- tailing from another process: only the contiguous prefix ------------------------


async def test_a_tail_reader_of_a_ranged_fill_sees_only_the_contiguous_prefix(tmp_path):
    store, staging = open_filesystem(tmp_path)
    blob = os.urandom(3 * MiB)
    digest = Digest.parse(digest_of(blob))
    writer = staging.claim_fill(digest)
    assert writer is not None
    try:
        writer.announce_prefix(0)
        writer.announce_size(len(blob))
        reader = await TailReader.open(staging, store, digest)
        assert reader is not None
        writer.write_at([blob[2 * MiB:]], 2 * MiB)  # a later part lands first
        writer.write_at([blob[:MiB]], 0)
        writer.announce_prefix(MiB)
        spans = reader.spans()
        span = await asyncio.wait_for(spans.__anext__(), 5)
        assert (span.offset, span.length) == (0, MiB)  # not the file's 3 MiB
        writer.write_at([blob[MiB:2 * MiB]], MiB)
        writer.absorb(len(blob))
        writer.verify(digest, len(blob))
        writer.announce_prefix(len(blob))
        span = await asyncio.wait_for(spans.__anext__(), 5)
        assert (span.offset, span.length) == (MiB, 2 * MiB - 1)  # last byte held back
        writer.announce_verified()
        span = await asyncio.wait_for(spans.__anext__(), 5)
        assert (span.offset, span.length) == (3 * MiB - 1, 1)
        await spans.aclose()
        reader.close()
    finally:
        writer.abort()
