"""The pull-through parts on their own: the two coordination implementations (this host
only, Redis), the three shapes of a blob answer, a fill's state machine, the bounded
table of the hot paths."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from proxy.bounded import BoundedDict
from proxy.config import ClusterConfig
from proxy.errors import BadGateway, Unavailable
from proxy.handlers.common import HOSTED, PULLTHROUGH, ROUTER, STORE
from proxy.pullthrough.cluster import Cluster, FillLease
from proxy.pullthrough.coordination import SOLE, Holder, HostOnly
from proxy.pullthrough.fill import TRANSITIONS, BlobFill, FillState
from proxy.reference import Digest
from proxy.results import CacheOutcome, FillingBlob, StoredBlob, UpstreamHead
from proxy.storage import Staging
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import make_config
from tests.support.registry import free_port
from tests.support.store import wait_stored

D = Digest.parse("sha256:" + "ab" * 32)


async def no_reopen(start: int, end: int | None) -> AsyncIterator[bytes]:
    raise AssertionError("nothing to reopen")


async def test_host_only_fills_alone_and_takes_turns_at_maintenance(tmp_path: Path):
    staging = Staging(tmp_path)
    staging.open()
    a, b = HostOnly(staging.try_lock), HostOnly(staging.try_lock)  # two workers of a host
    lease = await a.claim_fill(D)
    assert lease is SOLE and not lease.look_again and await lease.still_held()
    async with lease.kept():
        pass
    assert await a.claim_job("manifest:x", 5.0) and await b.claim_job("manifest:x", 5.0)
    assert await a.join(Holder("http://10.0.0.9:5000", 1), D, no_reopen) is None
    async with a.maintenance() as got_a:
        assert got_a
        async with b.maintenance() as got_b:
            assert not got_b, "one eviction pass at a time on the host"
    async with b.maintenance() as got_b:
        assert got_b, "released when the first pass ended"
    # no internal endpoint and no upload registry without a cluster
    assert not a.authorized("s" * 32) and not a.authorized(None)
    await a.register_upload("u1", 60)
    assert await a.upload_owner("u1") is None and a.session is None


async def test_cluster_gives_one_fill_lease_and_one_job_lock_across_replicas(redis_url: str):
    a = Cluster(ClusterConfig("http://10.0.0.1:5000", "s" * 32, lease=1.0), redis_url)
    b = Cluster(ClusterConfig("http://10.0.0.2:5000", "s" * 32, lease=1.0), redis_url)
    try:
        assert a.patience == 6.0  # a dead holder's lease expires first
        lease = await a.claim_fill(D)
        assert isinstance(lease, FillLease) and lease.look_again
        assert await b.claim_fill(D) == Holder("http://10.0.0.1:5000", lease.token)
        assert await lease.still_held()
        await lease.release()
        taken = await b.claim_fill(D)
        assert isinstance(taken, FillLease) and taken.token > lease.token
        assert not await lease.still_held(), "fenced: the lease is b's now"
        await taken.release()
        assert await a.claim_job("tag:x", 5.0)
        assert not await b.claim_job("tag:x", 5.0), "the peer waits for a's answer"
        await a.register_upload("u1", 60)
        assert await b.upload_owner("u1") == "http://10.0.0.1:5000"
        assert await a.upload_owner("u1") is None  # (its own)
    finally:
        await a.close()
        await b.close()


async def test_cluster_without_redis_fills_alone_and_skips_unreachable_holders():
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(ClusterConfig("http://10.0.0.1:5000", "s" * 32, lease=1.0),
                          f"redis://127.0.0.1:{free_port()}/0", session)
        try:
            assert await cluster.claim_fill(D) is SOLE
            assert await cluster.claim_job("tag:x", 1.0)
            gone = Holder(f"http://127.0.0.1:{free_port()}", 1)
            assert await cluster.join(gone, D, no_reopen) is None
        finally:
            await cluster.close()


async def test_a_blob_answer_is_one_of_three_shapes(aiohttp_server, tmp_path: Path):
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    server = await aiohttp_server(create_app(make_config(tmp_path / "data", {"fake.io": up},
                                                         hosted=("team/*",))))
    app = server.app
    data = os.urandom(300_000)
    digest = Digest.parse(fake.add_blob(data))
    route = app[ROUTER].route("lib/x")
    pullthrough = app[PULLTHROUGH]
    assert await pullthrough.blob(route, digest, head=True) == UpstreamHead(
        digest, len(data), CacheOutcome.MISS)
    filling = await pullthrough.blob(route, digest, head=False)
    assert isinstance(filling, FillingBlob)
    assert (filling.size, filling.outcome) == (len(data), CacheOutcome.MISS)
    try:
        assert b"".join([chunk async for chunk in filling.reader.stream()]) == data
    finally:
        filling.reader.close()
    await wait_stored(tmp_path / "data", str(digest))  # published just after the last byte
    store = app[STORE]
    assert await pullthrough.blob(route, digest, head=False) == StoredBlob(
        digest, len(data), CacheOutcome.HIT)
    hosted = app[ROUTER].route("team/app")
    await store.link_blob(hosted.key, digest)
    assert await app[HOSTED].blob(hosted, digest, head=True) == StoredBlob(
        digest, len(data), CacheOutcome.HOSTED)


async def test_a_fill_moves_only_forward(tmp_path: Path):
    store = Staging(tmp_path)
    store.open()
    assert not any(TRANSITIONS[s] for s in (FillState.PUBLISHED, FillState.FAILED,
                                            FillState.UNPUBLISHED)), "ends are final"
    writer = store.claim_fill(D)
    assert writer is not None
    fill = BlobFill(D, writer)
    try:
        assert fill.state is FillState.RECEIVING and not fill.verified and not fill.ended
        with pytest.raises(AssertionError):
            fill._enter(FillState.PUBLISHED)  # never published unverified
        fill._enter(FillState.VERIFIED)
        assert fill.verified and not fill.ended
        fill._fail(Unavailable("lost the fill lease"))
        assert fill.state is FillState.UNPUBLISHED and fill.verified and fill.ended
    finally:
        writer.abort()

    writer = store.claim_fill(D)
    assert writer is not None
    failed = BlobFill(D, writer)
    reader = failed.reader()
    try:
        failed._fail(BadGateway("upstream content failed verification"))
        assert failed.state is FillState.FAILED and not failed.verified and failed.ended
        with pytest.raises(BadGateway):  # every reader gets the error, never the bytes
            async for _ in reader.spans():
                pass
    finally:
        reader.close()
        writer.abort()


def test_a_bounded_dict_starts_over_when_full():
    table: BoundedDict[str, int] = BoundedDict(3)
    for i, key in enumerate("abc"):
        table[key] = i
    table["a"] = 9  # an update of a key it holds keeps everything
    assert table == {"a": 9, "b": 1, "c": 2}
    table["d"] = 3  # a new key past the limit: it forgets the rest
    assert table == {"d": 3}
