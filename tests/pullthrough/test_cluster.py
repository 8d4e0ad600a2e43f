"""Three replicas on one S3 bucket (SeaweedFS) and one Redis: single flight across replicas,
a replica killed mid-fill, and real clients against every replica.

Every replica is a real ``regproxy serve`` process with its own local scratch directory,
configured through a config.toml as an operator would; they share nothing but the bucket,
Redis and the cluster secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import redis

from proxy.app import create_app
from proxy.config import ClusterConfig, S3Config
from proxy.pullthrough.cluster import Cluster
from proxy.reference import Digest
from proxy.storage import RegistryStore
from proxy.storage.backend import open_s3
from tests.support.cluster import Replicas, _config
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import make_random_bytes, make_tar_layer, push_image
from tests.support.proxyfix import make_config
from tests.support.registry import free_port, upstream_gets
from tests.support.seaweed import SeaweedFS
from tests.support.skopeo import read_oci_layout_index, skopeo_copy
from tests.support.store import stored_blobs, tmp_files

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3_prefix(seaweedfs: SeaweedFS) -> S3Config:
    return seaweedfs.s3_config(prefix=f"cluster-{secrets.token_hex(4)}/")


@pytest.fixture
async def bucket(s3_prefix: S3Config) -> AsyncIterator[RegistryStore]:
    async with open_s3(s3_prefix) as store:
        yield store


async def _keys(store: RegistryStore, under: str) -> list[str]:
    return [key async for key, _, _ in store.driver._list(under)]


@pytest.fixture
def replicas(tmp_path: Path, upstream_registry, s3_prefix: S3Config, redis_url: str
             ) -> Iterator[Replicas]:
    group = Replicas(tmp_path, upstream_registry.url, s3_prefix, redis_url).start()
    try:
        yield group
    finally:
        group.stop()


async def _replica(aiohttp_server, data: Path, upstream_port: int, s3: S3Config, redis_url: str,
                   *, advertise: str = "http://127.0.0.1:1", lease: float = 30.0,
                   port: int | None = None) -> str:
    """An in-process replica on the shared bucket and Redis; returns its base URL."""
    cfg = make_config(data, {"fake.io": f"http://127.0.0.1:{upstream_port}"}, s3=s3,
                      cache_backend="redis", cache_url=redis_url,
                      cluster=ClusterConfig(advertise, "s" * 32, lease=lease))
    server = await aiohttp_server(create_app(cfg), **({"port": port} if port else {}))
    return f"http://127.0.0.1:{server.port}"


async def _get_blob(session: aiohttp.ClientSession, base: str, repo: str, digest: str
                    ) -> tuple[str, int, float]:
    """sha256 of the body, its size, and the time to its first byte."""
    started = time.monotonic()
    h = hashlib.sha256()
    size, ttfb = 0, 0.0
    async with session.get(f"{base}/v2/{repo}/blobs/{digest}") as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_any():
            if not size:
                ttfb = time.monotonic() - started
            h.update(chunk)
            size += len(chunk)
    return f"sha256:{h.hexdigest()}", size, ttfb


async def test_30_cold_clients_on_3_replicas_make_one_upstream_transfer_per_blob(
        replicas: Replicas, upstream_registry, http_session, bucket: RegistryStore, tmp_path: Path):
    reg = upstream_registry
    repo = f"cluster/burst{secrets.token_hex(3)}"
    # seeds no other module uses: the upstream registry (and its access log) is shared
    layers = [make_random_bytes(48 * MiB, seed=171), make_random_bytes(6 * MiB, seed=172),
              make_tar_layer(seed=173)]
    image = await push_image(http_session, reg.url, repo, "v1", layers)
    digests = [layer.digest for layer in image.layers]

    async with aiohttp.ClientSession() as session:
        jobs = [_get_blob(session, replicas.procs[i % 3].url, repo, d)
                for d in digests for i in range(30)]
        results = await asyncio.gather(*jobs)

    for i, d in enumerate(digests):
        got = results[i * 30:(i + 1) * 30]
        assert {r[0] for r in got} == {d}, "every client gets the exact blob"
        assert upstream_gets(reg, f"/blobs/{d}") == 1, f"one upstream transfer of {d}"
    big = results[:30]
    print(f"\n48 MiB blob, 30 clients on 3 replicas: TTFB median "
          f"{statistics.median(r[2] for r in big) * 1000:.0f} ms, max "
          f"{max(r[2] for r in big) * 1000:.0f} ms")
    stored = await _keys(bucket, "blobs/")
    for d in digests:
        hexpart = d.split(":")[1]
        assert f"sha256/{hexpart[:2]}/{hexpart}" in stored
        assert await bucket.blob_size(Digest.parse(d)) == next(
            r[1] for r in results if r[0] == d)
    assert await _keys(bucket, "_uploads/") == []
    for proc in replicas.procs:  # objects live in the bucket only; scratch space is empty
        data = proc.workdir / "data"
        assert await stored_blobs(data) == {}
        assert tmp_files(data) == []


async def test_replica_killed_mid_fill_others_take_over(
        aiohttp_server, tmp_path: Path, s3_prefix: S3Config, redis_url: str, bucket: RegistryStore):
    fake = FakeUpstream(chunk_delay=0.004)  # 24 MiB in 64 KiB chunks: ~1.5 s per transfer
    data = make_random_bytes(24 * MiB, seed=81)
    digest = fake.add_blob(data)
    server = await aiohttp_server(fake.app())
    group = Replicas(tmp_path, f"http://127.0.0.1:{server.port}", s3_prefix, redis_url,
                     lease="2s")
    await asyncio.get_running_loop().run_in_executor(None, group.start)
    r = redis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as session:
            async def client(i: int) -> tuple[str, int]:
                """A client behind a load balancer: retries on another replica when the
                connection breaks, as docker/containerd retry a failed layer."""
                for attempt in range(4):
                    base = group.procs[(i + attempt) % 3].url
                    try:
                        got, _, _ = await _get_blob(session, base, "team/slow", digest)
                        return got, attempt
                    except (aiohttp.ClientError, AssertionError) as exc:
                        print(f"client {i} attempt {attempt} on {base}: {exc!r}")
                        await asyncio.sleep(0.2)
                raise AssertionError(f"client {i} never got the blob")

            tasks = [asyncio.create_task(client(i)) for i in range(9)]
            holder = None
            deadline = time.monotonic() + 20
            while holder is None and time.monotonic() < deadline:
                value = r.get(f"regproxy:fill:{digest}")
                if value is not None:
                    holder = value.decode().partition("|")[2]
                await asyncio.sleep(0.02)
            assert holder is not None, "some replica took the fill lease"
            while fake.count("GET", f"/blobs/{digest}") == 0:  # noqa: ASYNC110 (a fake's counter)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.4)  # well into the transfer
            assert await bucket.blob_size(Digest.parse(digest)) is None  # not published yet
            victim = group.by_url(holder)
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            deadline = time.monotonic() + 15  # clients finish at verification; the S3
            while await bucket.blob_size(Digest.parse(digest)) is None:  # commit follows
                assert time.monotonic() < deadline, "the taken-over fill was published"
                await asyncio.sleep(0.1)
    finally:
        r.close()
        await asyncio.get_running_loop().run_in_executor(None, group.stop)

    assert all(got == digest for got, _ in results), "every client ends with the exact blob"
    assert any(attempt > 0 for _, attempt in results), "clients of the dead replica retried"
    assert fake.count("GET", f"/blobs/{digest}") == 2, "the fill was taken over once"
    assert await bucket.blob_size(Digest.parse(digest)) == len(data)
    body = b"".join([c async for c in bucket.open_blob(Digest.parse(digest))])
    assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]


async def test_skopeo_pulls_through_every_replica(
        replicas: Replicas, upstream_registry, http_session, tmp_path: Path):
    reg = upstream_registry
    repo = f"cluster/skopeo{secrets.token_hex(3)}"
    image = await push_image(http_session, reg.url, repo, "v1",
                             [make_tar_layer(seed=91), make_random_bytes(3 * MiB, seed=92)],
                             schema="oci")
    for i, proc in enumerate(replicas.procs):
        out = tmp_path / f"pull{i}"
        await skopeo_copy(f"docker://{proc.host}/{repo}:v1", f"oci:{out}:v1", "--preserve-digests")
        index = read_oci_layout_index(out)
        assert index["manifests"][0]["digest"] == image.digest
        for layer in image.layers:
            hexpart = layer.digest.split(":")[1]
            assert (out / "blobs" / "sha256" / hexpart).exists()
    assert upstream_gets(reg, f"/{repo}/manifests/v1") == 1, "the tag is fetched once for all"
    for layer in image.layers:
        assert upstream_gets(reg, f"/blobs/{layer.digest}") == 1


async def test_a_push_spread_over_replicas_lands_once(
        tmp_path: Path, upstream_registry, s3_prefix: S3Config, redis_url: str, bucket: RegistryStore):
    """A load balancer without session affinity: each request of one push goes to another
    replica. The upload lives on the replica that started it; the others forward to it."""
    group = Replicas(tmp_path, upstream_registry.url, s3_prefix, redis_url,
                     extra='[hosted]\nrepositories = ["team/*"]\n')
    await asyncio.get_running_loop().run_in_executor(None, group.start)
    r0, r1, r2 = (p.url for p in group.procs)
    layer = make_random_bytes(3 * MiB + 17, seed=97)
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["%s"]}}' % (
        layer_digest.encode())
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{r0}/v2/team/app/blobs/uploads/") as resp:
                assert resp.status == 202
                location = resp.headers["Location"]
            half = len(layer) // 2
            async with s.patch(f"{r1}{location}", data=layer[:half], headers={
                    "Content-Range": f"0-{half - 1}", "Content-Type": "application/octet-stream"}) as resp:
                assert resp.status == 202, await resp.text()
                assert resp.headers["Range"] == f"0-{half - 1}"
            async with s.get(f"{r2}{location}") as resp:  # status, asked of a third replica
                assert resp.status == 204 and resp.headers["Range"] == f"0-{half - 1}"
            async with s.patch(f"{r2}{location}", data=layer[half:], headers={
                    "Content-Range": f"{half}-{len(layer) - 1}"}) as resp:
                assert resp.status == 202, await resp.text()
            async with s.put(f"{r1}{location}?digest={layer_digest}") as resp:
                assert resp.status == 201, await resp.text()
            async with s.post(f"{r2}/v2/team/app/blobs/uploads/?digest={config_digest}",
                              data=config) as resp:
                assert resp.status == 201
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": layer_digest, "size": len(layer)}]}).encode()
            async with s.put(f"{r0}/v2/team/app/manifests/v1", data=manifest, headers={
                    "Content-Type": "application/vnd.oci.image.manifest.v1+json"}) as resp:
                assert resp.status == 201, await resp.text()
            for base in (r0, r1, r2):  # every replica serves the pushed image
                async with s.get(f"{base}/v2/team/app/blobs/{layer_digest}") as resp:
                    assert resp.status == 200 and await resp.read() == layer
                async with s.get(f"{base}/v2/team/app/tags/list") as resp:
                    assert (await resp.json())["tags"] == ["v1"]
        assert await bucket.blob_size(Digest.parse(layer_digest)) == len(layer)
        for proc in group.procs:  # the upload was published and removed where it lived
            assert list((proc.workdir / "data" / "uploads").iterdir()) == []
        out = tmp_path / "pulled"
        await skopeo_copy(f"docker://{group.procs[1].host}/team/app:v1", f"oci:{out}:v1",
                          "--preserve-digests")
        assert read_oci_layout_index(out)["manifests"][0]["digest"] == (
            "sha256:" + hashlib.sha256(manifest).hexdigest())
    finally:
        await asyncio.get_running_loop().run_in_executor(None, group.stop)


async def test_maintenance_runs_on_one_replica_at_a_time(redis_url: str):

    a = Cluster(ClusterConfig("http://10.0.0.1:5000", "s" * 32, lease=1.0), redis_url)
    b = Cluster(ClusterConfig("http://10.0.0.2:5000", "s" * 32, lease=1.0), redis_url)
    try:
        async with a.exclusive("maintenance") as got_a:
            assert got_a
            await asyncio.sleep(1.5)  # longer than the lease: renewal keeps it
            async with b.exclusive("maintenance") as got_b:
                assert not got_b
        async with b.exclusive("maintenance") as got_b:
            assert got_b, "released when the first job ended"
        assert a.authorized("s" * 32) and not a.authorized("s" * 31) and not a.authorized(None)
    finally:
        await a.close()
        await b.close()


async def test_readyz_reports_an_unreachable_object_store(aiohttp_server, tmp_path: Path,
                                                         s3_prefix: S3Config):

    good = await aiohttp_server(create_app(make_config(tmp_path / "a", {}, s3=s3_prefix)))
    dead = replace(s3_prefix, endpoint_url=f"http://127.0.0.1:{free_port()}")
    bad = await aiohttp_server(create_app(make_config(tmp_path / "b", {}, s3=dead)))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{good.port}/readyz") as resp:
            assert resp.status == 200
        async with s.get(f"http://127.0.0.1:{bad.port}/readyz") as resp:
            assert resp.status == 503
            assert "bucket" in (await resp.json())["storage"]


async def test_a_filler_that_lost_its_lease_does_not_publish(
        aiohttp_server, tmp_path: Path, s3_prefix: S3Config, redis_url: str, bucket: RegistryStore):
    """Fencing: the lease changed hands mid-fill (this filler was paused past it, say), so
    the filler must not publish, though its own clients still get the verified bytes."""

    fake = FakeUpstream(chunk_delay=0.005)
    data = make_random_bytes(8 * MiB, seed=99)
    digest = fake.add_blob(data)
    up = await aiohttp_server(fake.app())
    base = await _replica(aiohttp_server, tmp_path / "d", up.port, s3_prefix, redis_url)
    r = redis.Redis.from_url(redis_url)
    try:
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(_get_blob(s, base, "team/fenced", digest))
            key = f"regproxy:fill:{digest}"
            deadline = time.monotonic() + 10
            while r.get(key) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            r.set(key, "999999|http://127.0.0.1:2", px=30_000)  # someone else's now
            got, size, _ = await task
        assert (got, size) == (digest, len(data)), "the client still gets the verified blob"
        await asyncio.sleep(0.5)
        assert await bucket.blob_size(Digest.parse(digest)) is None, "not published"
        assert await _keys(bucket, "_uploads/") == []
    finally:
        r.close()


async def test_a_manifest_asked_of_every_replica_at_once_is_fetched_once(
        replicas: Replicas, upstream_registry, http_session):
    reg = upstream_registry
    repo = f"cluster/tag{secrets.token_hex(3)}"
    image = await push_image(http_session, reg.url, repo, "v1", [make_tar_layer(seed=93)],
                             schema="oci")
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    async def get(base: str) -> str:
        async with http_session.get(f"{base}/v2/{repo}/manifests/v1", headers=accept) as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers["Docker-Content-Digest"]

    digests = await asyncio.gather(*(get(p.url) for p in replicas.procs for _ in range(10)))
    assert set(digests) == {image.digest}
    assert upstream_gets(reg, f"/{repo}/manifests/") == 1, "one manifest request for the fleet"

    # the same for a manifest asked by digest (what clients do for an index's children)
    other = await push_image(http_session, reg.url, repo, None, [make_tar_layer(seed=94)],
                             schema="oci")

    async def by_digest(base: str) -> bytes:
        async with http_session.get(f"{base}/v2/{repo}/manifests/{other.digest}",
                                    headers=accept) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()

    bodies = await asyncio.gather(*(by_digest(p.url) for p in replicas.procs for _ in range(10)))
    assert set(bodies) == {other.manifest}
    assert upstream_gets(reg, f"/{repo}/manifests/{other.digest}") == 1


async def test_a_range_from_a_replica_that_is_not_filling(
        aiohttp_server, tmp_path: Path, s3_prefix: S3Config, redis_url: str):
    """Replica B serves ``Range`` requests of a blob replica A is still filling: a ranged
    stream from A's internal endpoint, exact bytes, no second upstream transfer."""

    fake = FakeUpstream(chunk_delay=0.004)
    data = make_random_bytes(12 * MiB, seed=101)
    digest = fake.add_blob(data)
    up = await aiohttp_server(fake.app())
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        await _replica(aiohttp_server, tmp_path / f"r{i}", up.port, s3_prefix, redis_url,
                       advertise=f"http://127.0.0.1:{port}", lease=5.0, port=port)
    a, b = (f"http://127.0.0.1:{p}/v2/team/r/blobs/{digest}" for p in ports)
    async with aiohttp.ClientSession() as s:
        async def whole() -> bytes:
            async with s.get(a) as resp:
                return await resp.read()

        first = asyncio.create_task(whole())
        while fake.count("GET", f"/blobs/{digest}") == 0:  # noqa: ASYNC110 (a fake's counter)
            await asyncio.sleep(0.01)
        async with s.get(b, headers={"Range": "bytes=1000-2000999"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 1000-2000999/{len(data)}"
            assert await resp.read() == data[1000:2001000]
        async with s.get(b, headers={"Range": f"bytes={len(data) - 10}-"}) as resp:
            assert resp.status == 206 and await resp.read() == data[-10:]  # the held last byte too
        assert await first == data
    assert fake.count("GET", f"/blobs/{digest}") == 1


async def test_a_holder_this_replica_cannot_reach_does_not_starve_its_clients(
        aiohttp_server, tmp_path: Path, s3_prefix: S3Config, redis_url: str, bucket: RegistryStore):
    """A lease held by a replica whose advertise_url is wrong (or across a network split):
    after the lease period plus a margin the client is served from a fill of its own."""

    fake = FakeUpstream()
    data = make_random_bytes(3 * MiB, seed=103)
    digest = fake.add_blob(data)
    up = await aiohttp_server(fake.app())
    base = await _replica(aiohttp_server, tmp_path / "d", up.port, s3_prefix, redis_url,
                          lease=1.0)
    r = redis.Redis.from_url(redis_url)
    r.set(f"regproxy:fill:{digest}", f"7|http://127.0.0.1:{free_port()}", px=60_000)
    try:
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            got, size, _ = await _get_blob(s, base, "team/split", digest)
        assert (got, size) == (digest, len(data))
        assert time.monotonic() - started >= 5.0, "it waited for the holder first"
        assert fake.count("GET", f"/blobs/{digest}") == 1
    finally:
        r.close()


async def test_gc_command_on_the_bucket_waits_its_turn(tmp_path: Path, s3_prefix: S3Config,
                                                       redis_url: str, bucket: RegistryStore):
    """``regproxy gc`` on an S3 replica: it removes an unreferenced object from the bucket,
    and refuses (exit 1) while another replica holds the maintenance lease."""
    import sys


    cfg = _config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", s3_prefix, redis_url,
                  "15s", "")
    orphan = make_random_bytes(4096, seed=105)
    (tmp_path / "orphan").write_bytes(orphan)
    d = Digest.parse("sha256:" + hashlib.sha256(orphan).hexdigest())
    await bucket.import_file(tmp_path / "orphan", d, len(orphan))

    async def gc() -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "gc", "--config", str(cfg), "--grace", "0",
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    r = redis.Redis.from_url(redis_url)
    try:
        r.set("regproxy:lock:maintenance", "1|http://elsewhere", px=30_000)
        code, _, err = await gc()
        assert code == 1 and "another replica" in err
        assert await bucket.blob_size(d) == len(orphan)
        r.delete("regproxy:lock:maintenance")
        code, out, err = await gc()
        assert code == 0, err
        assert f"deleted blob {d}" in out
        assert await bucket.blob_size(d) is None
    finally:
        r.close()
