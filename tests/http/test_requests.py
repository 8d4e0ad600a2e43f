"""Unit tests: grammar, ranges, negotiation, pagination, error bodies, config, challenges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError, from_dict, load, parse_duration, parse_size
from proxy.errors import (
    BlobUnknown,
    DigestInvalid,
    NameInvalid,
    RangeNotSatisfiable,
    RegistryError,
    TagInvalid,
)
from proxy.handlers.ranges import parse_range
from proxy.mediatypes import accepts, parse_accept, platform_child
from proxy.pullthrough.service import paginate
from proxy.reference import Digest, parse_reference, validate_name
from proxy.upstream.auth import parse_challenges
from proxy.upstream.breaker import BreakerState, CircuitBreaker

SHA = "sha256:" + "ab" * 32


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "a/b/c/d/e", "my-org/my_app",
                                  "a.b/c__d", "ghcr.io/org/img", "x" * 255, "a--b/c---d"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Alpine", "a/../b", "..", "a//b", "/a", "a/", "a_", "_a",
                                  "a/.hidden", "a b", "a\x00b", "x" * 256, "a%2fb", "a:b"])
def test_invalid_names(name):
    with pytest.raises(NameInvalid):
        validate_name(name)


def test_references():
    assert parse_reference("latest") == "latest"
    assert parse_reference("v1.2_3-rc") == "v1.2_3-rc"
    assert parse_reference(SHA) == Digest("sha256", "ab" * 32)
    assert str(parse_reference("sha512:" + "0" * 128)) == "sha512:" + "0" * 128
    for bad in ("-x", ".x", "a" * 129, "a/b", "tag!"):
        with pytest.raises(TagInvalid):
            parse_reference(bad)
    for bad in ("sha256:short", "sha256:" + "AB" * 32, "md5:" + "0" * 32, "sha512:" + "0" * 64):
        with pytest.raises(DigestInvalid):
            parse_reference(bad)


@given(st.text(max_size=300))
def test_names_and_references_never_escape_the_grammar(text):
    try:
        validate_name(text)
    except NameInvalid:
        pass
    else:
        assert ".." not in text and not text.startswith("/") and "\\" not in text
    try:
        ref = parse_reference(text)
    except RegistryError as exc:
        assert exc.status == 400
    else:
        assert "/" not in str(ref)


def test_digest_of():
    assert str(Digest.of(b"")) == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 10, None),
    ("bytes=0-0", 10, (0, 1)),
    ("bytes=2-5", 10, (2, 6)),
    ("bytes=5-", 10, (5, 10)),
    ("bytes=-3", 10, (7, 10)),
    ("bytes=-30", 10, (0, 10)),
    ("bytes=8-100", 10, (8, 10)),
])
def test_ranges(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=5-2", "bytes=0-1,3-4", "bytes=-0",
                                    "items=0-1", "bytes=", "bytes=-", "bytes=a-b"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 10)
    assert info.value.status == 416
    assert info.value.headers["Content-Range"] == "bytes */10"


@given(st.text(max_size=40), st.integers(min_value=0, max_value=1 << 40))
def test_range_parser_never_crashes(header, size):
    try:
        rng = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if rng is not None:
        start, end = rng
        assert 0 <= start < end <= size


def test_accept_negotiation():
    accepted = parse_accept([
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json; q=0.5, application/vnd.oci.image.manifest.v1+json",
    ])
    assert accepted == {"application/vnd.docker.distribution.manifest.v2+json",
                        "application/vnd.oci.image.index.v1+json",
                        "application/vnd.oci.image.manifest.v1+json"}
    assert accepts(accepted, "application/vnd.oci.image.index.v1+json")
    assert not accepts(accepted, "application/vnd.docker.distribution.manifest.list.v2+json")
    assert accepts(set(), "anything/at-all")
    assert accepts(parse_accept(["application/json, */*"]), "application/vnd.oci.image.index.v1+json")


def test_platform_child():
    index = json.dumps({"manifests": [
        {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode()
    assert platform_child(index, "linux", "amd64") == "sha256:amd"
    assert platform_child(index, "windows", "amd64") is None
    assert platform_child(b"not json", "linux", "amd64") is None


def test_pagination():
    items = ["a", "b", "c", "d"]
    assert paginate(items, None, None) == (items, False)
    assert paginate(items, 2, None) == (["a", "b"], True)
    assert paginate(items, 2, "b") == (["c", "d"], False)
    assert paginate(items, 10, "d") == ([], False)


def test_error_bodies():
    err = BlobUnknown("no such blob", detail={"digest": SHA})
    assert err.status == 404
    assert json.loads(err.body()) == {"errors": [
        {"code": "BLOB_UNKNOWN", "message": "no such blob", "detail": {"digest": SHA}}]}


def test_challenges():
    (c,) = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull,push"}
    (b,) = parse_challenges('Basic realm="Registry Realm"')
    assert b.scheme == "basic" and b.params["realm"] == "Registry Realm"


def test_breaker_opens_and_probes():
    now = [0.0]
    br = CircuitBreaker(threshold=2, cooldown=10, clock=lambda: now[0])
    assert br.allow()
    br.failure()
    assert br.state is BreakerState.CLOSED
    br.failure()
    assert br.state is BreakerState.OPEN and not br.allow()
    now[0] = 11
    assert br.allow() and not br.allow()  # one probe at a time
    br.success()
    assert br.state is BreakerState.CLOSED


def test_config_defaults_and_errors(tmp_path: Path):
    cfg = load(Path(__file__).resolve().parents[2] / "config.toml")
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 5000)
    assert cfg.default_upstream == "docker.io" and cfg.upstreams["docker.io"].library_prefix
    assert cfg.tag_ttl == 300
    assert parse_size("x", "4MiB") == 4 << 20 and parse_duration("x", "1h") == 3600
    cases = [
        ({"server": {"listen": "nope"}}, "server.listen"),
        ({"server": {"lisen": "1:2"}}, "server.lisen"),
        ({"cache": {"tag_ttl": "soon"}}, "cache.tag_ttl"),
        ({"upstreams": {"x.io": {}}}, "upstreams.x.io.url"),
        ({"upstreams": {"x.io": {"url": "ftp://x"}}}, "upstreams.x.io.url"),
        ({"upstreams": {"x.io": {"url": "http://x", "username": "u"}}}, "upstreams.x.io.password"),
        ({"proxy": {"default_upstream": "y.io"}}, "proxy.default_upstream"),
        ({"storage": {"backend": "tape"}}, "storage.backend"),
        ({"storage": {"backend": "s3"}}, "storage.s3.bucket"),
        ({"storage": {"s3": {"bucket": "b"}}}, "storage.s3"),
        ({"storage": {"backend": "s3", "s3": {"bucket": "b", "part_size": "1MiB"}}},
         "storage.s3.part_size"),
        ({"storage": {"backend": "s3", "s3": {"bucket": "b", "access_key": "k"}}},
         "storage.s3.secret_key"),
        ({"storage": {"backend": "s3", "s3": {"bucket": "b", "endpoint": "minio:9000"}}},
         "storage.s3.endpoint"),
        ({"cluster": {"advertise_url": "http://10.0.0.1:5000", "secret": "x" * 20}}, "cluster"),
        ({"cache": {"backend": "redis", "url": "redis://r:6379/0"},
          "cluster": {"advertise_url": "http://10.0.0.1:5000"}}, "cluster.secret"),
        ({"cache": {"backend": "redis", "url": "redis://r:6379/0"},
          "cluster": {"advertise_url": "http://10.0.0.1:5000", "secret": "short"}}, "cluster.secret"),
    ]
    for data, key in cases:
        with pytest.raises(ConfigError) as info:
            from_dict(data)
        assert info.value.key == key
    cfg = from_dict({"storage": {"backend": "s3", "s3": {
                        "bucket": "cache", "endpoint": "http://minio:9000/", "prefix": "rp/",
                        "access_key": "AK", "secret_key": "SK", "redirect": True}},
                     "cache": {"backend": "redis", "url": "redis://r:6379/0"},
                     "cluster": {"advertise_url": "http://10.0.0.1:5000/", "secret": "s" * 32,
                                 "lease": "5s"}})
    assert cfg.s3 is not None and cfg.cluster is not None
    assert (cfg.s3.bucket, cfg.s3.endpoint_url, cfg.s3.prefix, cfg.s3.redirect) == (
        "cache", "http://minio:9000", "rp/", True)
    assert (cfg.cluster.advertise_url, cfg.cluster.lease) == ("http://10.0.0.1:5000", 5.0)
    assert "s" * 32 not in repr(cfg) and "SK" not in repr(cfg.s3)  # secrets stay out of logs
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_upstream_flag_overrides():
    cfg = load(None).with_overrides(upstream="http://127.0.0.1:5001", listen="[::1]:6000",
                                    data_dir="/tmp/x")
    assert cfg.default_upstream == "127.0.0.1:5001"
    assert cfg.upstreams["127.0.0.1:5001"].url == "http://127.0.0.1:5001"
    assert not cfg.upstreams["127.0.0.1:5001"].library_prefix
    assert "docker.io" in cfg.upstreams["127.0.0.1:5001"].aliases  # it took the default's names
    assert (cfg.listen_host, cfg.listen_port, str(cfg.storage_root)) == ("::1", 6000, "/tmp/x")
    hub = load(None).with_overrides(upstream="https://registry-1.docker.io")
    assert hub.default_upstream == "docker.io"


async def test_fill_readers_are_woken_soon_after_bytes_arrive_even_between_steps(tmp_path):
    """Readers are woken per MiB, or NOTIFY_DELAY after the last wake-up: bytes that arrive
    just after one and are followed by a pause must not wait for the next chunk."""
    import asyncio
    import time

    from proxy.pullthrough.fill import NOTIFY_DELAY, BlobFill
    from proxy.storage import FilesystemStore

    store = FilesystemStore(tmp_path)
    store.open()
    digest = Digest.parse("sha256:" + "ab" * 32)
    writer = store.claim_fill(digest)
    assert writer is not None
    fill = BlobFill(digest, writer)
    try:
        fill._advance(1000)  # the first bytes: readers are woken at once
        waiter = asyncio.ensure_future(fill.wait_progress())
        fill._advance(1000)  # right after: below the step and within the delay
        started = time.monotonic()
        await asyncio.wait_for(waiter, timeout=1.0)  # woken by the deferred wake-up
        assert NOTIFY_DELAY * 0.5 <= time.monotonic() - started < 0.2
    finally:
        writer.abort()


def test_write_many_takes_more_buffers_than_one_writev_allows(tmp_path):
    """A batch of many small socket reads (a slow network) is more than IOV_MAX buffers."""
    import hashlib
    import os

    from proxy.storage import FilesystemStore

    store = FilesystemStore(tmp_path)
    store.open()
    chunks = [os.urandom(1 + i % 1500) for i in range(3000)]
    data = b"".join(chunks)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    writer = store.claim_fill(digest)
    assert writer is not None
    writer.write_many(chunks)
    writer.verify(digest, len(data))
    assert writer.publish(digest).read_bytes() == data


@pytest.mark.parametrize("fails", [False, True], ids=["written", "write-error"])
def test_the_fill_pipeline_settles_a_batch_whose_callback_is_still_queued(tmp_path, fails):
    """The thread finished a batch (or failed it: ENOSPC) and its done-callback is queued
    behind the fill task: awaiting the done future returns without yielding, so the fill
    must settle it itself (it spun forever once). Run in a thread: a spinning loop would
    never reach a timeout."""
    import asyncio
    import hashlib
    import os
    import threading
    import time

    from proxy.pullthrough import fill as fill_mod
    from proxy.storage import FilesystemStore

    store = FilesystemStore(tmp_path)
    store.open()
    chunk = os.urandom(fill_mod.PIPELINE_MAX_BATCH)
    digest = Digest("sha256", hashlib.sha256(chunk * 3).hexdigest())
    writer = store.claim_fill(digest)
    assert writer is not None
    finished = threading.Event()

    class Writer:
        def write_many(self, chunks: list[bytes]) -> None:
            try:
                if fails:
                    raise OSError(28, "No space left on device")
                writer.write_many(chunks)
            finally:
                finished.set()

    announced: list[int] = []
    outcome: list[BaseException | None] = []

    async def scenario() -> None:
        tee = fill_mod._Tee(Writer(), announced.append, threaded=True)  # type: ignore[arg-type]
        try:
            for _ in range(3):
                finished.clear()
                await tee.add(chunk)
                finished.wait(10)  # the thread is done (without the loop knowing yet)
                time.sleep(0.05)  # noqa: ASYNC251 - and has queued its result
                await asyncio.sleep(0)  # which is handled after this task now
            await tee.finish()
            outcome.append(None)
        except OSError as exc:
            await tee.stop()
            outcome.append(exc)

    runner = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    runner.start()
    runner.join(20)
    assert not runner.is_alive(), "the fill pipeline spun on a finished batch"
    if fails:
        assert isinstance(outcome[0], OSError) and outcome[0].errno == 28
        assert announced == []
    else:
        assert outcome == [None] and sum(announced) == 3 * len(chunk)
        writer.verify(digest, 3 * len(chunk))
    writer.abort()


async def test_keyed_locks_exclude_per_key_and_forget_idle_keys():
    import asyncio

    from proxy.singleflight import KeyedLocks

    locks = KeyedLocks()
    inside: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}

    async def work(key: str) -> None:
        async with locks.hold(key):
            inside[key] += 1
            peak[key] = max(peak[key], inside[key])
            await asyncio.sleep(0.01)
            inside[key] -= 1

    await asyncio.gather(*(work(k) for k in "abababab"))
    assert peak == {"a": 1, "b": 1}
    assert len(locks) == 0  # nobody holds or waits: nothing kept

    async def failing() -> None:
        async with locks.hold("c"):
            raise ValueError

    with pytest.raises(ValueError):
        await failing()
    assert len(locks) == 0

    async def holder(entered: asyncio.Event, release: asyncio.Event) -> None:
        async with locks.hold("d"):
            entered.set()
            await release.wait()

    entered, release = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(holder(entered, release))
    await entered.wait()
    waiter = asyncio.create_task(work("a"))  # another key is not blocked
    blocked = asyncio.create_task(holder(asyncio.Event(), asyncio.Event()))
    await waiter
    await asyncio.sleep(0.01)
    blocked.cancel()  # a waiter gives up: the holder keeps the entry
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert len(locks) == 1
    release.set()
    await first
    assert len(locks) == 0
    async with locks.hold("d"):  # and the key is free again
        assert len(locks) == 1
    assert len(locks) == 0


def test_a_fill_file_is_readable_at_either_path_around_its_publication(tmp_path):
    """Joiners open a fill's file by its temp path; publishing (a thread) may have renamed
    it into the store a moment before: the same bytes are then read from there."""
    import hashlib
    import os

    from proxy.storage import FilesystemStore

    store = FilesystemStore(tmp_path)
    store.open()
    data = os.urandom(5000)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    writer = store.claim_fill(digest)
    assert writer is not None
    writer.write(data)
    before = writer.open_reader(digest)
    writer.verify(digest, len(data))
    writer.publish(digest)
    writer.path.write_bytes(b"")  # a sibling worker's new fill of the same digest
    after = writer.open_reader(digest)
    try:
        assert os.pread(before, 10_000, 0) == os.pread(after, 10_000, 0) == data
    finally:
        os.close(before)
        os.close(after)
    writer.path.unlink()
    store.blob_path(digest).unlink()
    with pytest.raises(FileNotFoundError):
        writer.open_reader(digest)


def test_try_lock_is_exclusive_and_a_lock_on_a_removed_file_does_not_count(tmp_path):
    import fcntl
    import os

    from proxy.storage import FilesystemStore
    from proxy.storage.filesystem import _same_file

    store = FilesystemStore(tmp_path)
    store.open()
    with store.try_lock("tag:a") as first:
        assert first
        (path,) = (tmp_path / "locks").iterdir()
        with store.try_lock("tag:a") as second, store.try_lock("tag:b") as other:
            assert not second and other
        late = os.open(path, os.O_RDWR)  # opened just before the holder finishes
    try:
        assert not list((tmp_path / "locks").iterdir())
        fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free, but on a removed file
        assert not _same_file(late, path)
        with store.try_lock("tag:a") as third:
            assert third  # the next one takes a new file
    finally:
        os.close(late)


def test_start_up_cleaning_removes_free_lock_files_only(tmp_path):
    import os

    from proxy.storage import FilesystemStore

    store = FilesystemStore(tmp_path)
    store.open()
    (tmp_path / "locks" / "left-by-a-killed-process").touch()
    with store.try_lock("evict") as held:
        assert held
        store.clean_tmp()
        assert [p.name for p in (tmp_path / "locks").iterdir()] != []  # the held one stays
        assert not (tmp_path / "locks" / "left-by-a-killed-process").exists()
        with store.try_lock("evict") as again:
            assert not again  # and still excludes
    assert os.listdir(tmp_path / "locks") == []


async def test_handler_failures_become_oci_bodies(aiohttp_client, caplog):
    """A registry error keeps its code and status; anything unexpected is logged with its
    traceback and answered as an OCI UNKNOWN body that shows no trace of it."""
    from aiohttp import web

    from proxy.errors import BlobUnknown
    from proxy.handlers.common import oci

    async def unknown(request: web.Request) -> web.StreamResponse:
        raise BlobUnknown("blob sha256:abc unknown")

    async def broken(request: web.Request) -> web.StreamResponse:
        raise ValueError("secret internals")

    app = web.Application()
    app.router.add_get("/unknown", oci(unknown))
    app.router.add_get("/broken", oci(broken))
    client = await aiohttp_client(app)
    r = await client.get("/unknown")
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    r = await client.get("/broken")
    body = await r.text()
    assert r.status == 500 and r.headers["Content-Type"] == "application/json"
    assert '"code": "UNKNOWN"' in body or '"code":"UNKNOWN"' in body
    assert "secret internals" not in body and "Traceback" not in body
    assert "secret internals" in caplog.text  # the log has it
