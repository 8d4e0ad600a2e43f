"""The S3 driver against a real S3 server, the session's SeaweedFS (see tests/support/
seaweed.py): the driver contract, and what is S3's own (multipart streaming with bounded
memory, temp keys, presigned URLs, the use records of existing buckets). Each test works
under its own key prefix, so "nothing left" can be checked by listing it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.errors import DigestInvalid
from proxy.reference import Digest
from proxy.storage.driver.s3 import MiB, S3Driver
from tests.storage.driver_contract import DriverContract, read_all
from tests.support.seaweed import SeaweedFS, ensure_bucket, list_keys, list_multipart_uploads


@pytest.fixture
async def driver(seaweedfs: SeaweedFS) -> AsyncIterator[S3Driver]:
    """A driver under a fresh prefix of the session's bucket (handing out URLs)."""
    async with S3Driver(seaweedfs.s3_config(redirect=True)) as drv:
        await ensure_bucket(drv.client)
        yield drv


class TestS3Driver(DriverContract):
    pass  # (the module's driver fixture)


async def _keys(driver: S3Driver) -> list[str]:
    """Every object under the driver's prefix."""
    return await list_keys(driver.client, driver.object_key(""))


async def _uploads(driver: S3Driver) -> list[str]:
    """Incomplete multipart uploads under the driver's prefix."""
    return await list_multipart_uploads(driver.client, driver.object_key(""))


async def test_a_large_object_streams_and_is_visible_only_after_commit(driver: S3Driver):
    data = os.urandom(40 * MiB)
    digest = Digest.of(data)
    writer = driver.writer("big")
    for i in range(0, len(data), MiB):
        await writer.write(data[i:i + MiB])
        if i == 20 * MiB:  # parts are already in S3, under the temp key only
            assert await _uploads(driver) == [writer.temp_key]
            assert await driver.stat("big") is None
    await writer.commit(digest, len(data))
    assert await _keys(driver) == [driver.object_key("big")]  # the temp object is gone
    assert await _uploads(driver) == []
    part = driver.config.part_size
    assert part <= writer.max_held <= 2 * part, writer.max_held  # bounded: never the whole blob
    assert hashlib.sha256(await read_all(driver, "big")).hexdigest() == digest.hex
    for start, end in [(part - 10, part + 10), (5 * MiB, 9 * MiB)]:  # across parts
        assert await read_all(driver, "big", start, end) == data[start:end]


async def test_a_wrong_digest_leaves_no_object_and_no_upload(driver: S3Driver):
    data = os.urandom(12 * MiB)
    writer = driver.writer("bad")
    for i in range(0, len(data), MiB):
        await writer.write(data[i:i + MiB])
    with pytest.raises(DigestInvalid):
        await writer.commit(Digest.of(b"something else"), len(data))
    assert await _keys(driver) == []
    assert await _uploads(driver) == []


async def test_abort_drops_the_multipart_upload(driver: S3Driver):
    writer = driver.writer("aborted")
    for _ in range(18):
        await writer.write(os.urandom(MiB))
    assert await _uploads(driver) == [writer.temp_key]
    await writer.abort()
    assert await _uploads(driver) == []
    assert await _keys(driver) == []


async def test_purge_removes_the_uploads_a_killed_writer_left(driver: S3Driver):
    """A writer that never commits nor aborts (its process was killed) leaves a multipart
    upload; purging abandoned writes removes it, and leaves a younger one alone."""
    old = driver.writer("killed")
    await old.write(os.urandom(9 * MiB))  # one part sent: the multipart upload exists
    assert await _uploads(driver) == [old.temp_key]
    assert await driver.purge_incomplete(older_than=time.time() - 3600) == 0  # too young
    assert await _uploads(driver) == [old.temp_key]
    assert await driver.purge_incomplete(older_than=time.time() + 5) == 1
    assert await _uploads(driver) == []
    assert await _keys(driver) == []


async def test_a_small_object_is_one_verified_put(driver: S3Driver):
    data = b"config blob" * 100
    writer = driver.writer("small")
    await writer.write(data)
    assert await _uploads(driver) == []  # no multipart for an object under one part
    await writer.commit(Digest.of(data), len(data))
    assert await _keys(driver) == [driver.object_key("small")]


async def test_a_presigned_url_works_without_credentials_and_only_signed(driver: S3Driver):
    data = os.urandom(3 * MiB)
    await driver.put("blob", data)
    url = await driver.url("blob")
    assert url is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Range": "bytes=10-19"}) as resp:
            assert resp.status == 206 and await resp.read() == data[10:20]
        async with http.get(url.split("?", 1)[0]) as resp:  # the same object, unsigned
            assert resp.status == 403


async def test_no_url_unless_redirects_are_configured(seaweedfs: SeaweedFS):
    async with S3Driver(seaweedfs.s3_config()) as drv:
        assert await drv.url("blob") is None


async def test_uses_of_blobs_are_recorded_where_existing_buckets_have_them(driver: S3Driver):
    """``access/<alg>/<hex>`` for ``blobs/<alg>/<hex[:2]>/<hex>`` (layout 3): the last uses
    recorded by earlier versions still count, and a deleted blob's record goes with it."""
    d = Digest.of(b"blob")
    key = f"blobs/{d.algorithm}/{d.hex[:2]}/{d.hex}"
    await driver.put(key, b"blob")
    await driver.touch(key)
    await driver.settle()
    assert await _keys(driver) == sorted([driver.object_key(f"access/{d.algorithm}/{d.hex}"),
                                          driver.object_key(key)])
    await driver.delete(key)
    assert await _keys(driver) == []
