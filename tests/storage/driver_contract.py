"""The contract every storage driver passes (proxy.storage.driver.base.StorageDriver).

A driver's test module subclasses :class:`DriverContract` and gives it a ``driver``
fixture: an empty driver, ready to use (distribution's ``registry/storage/driver/
testsuites`` works the same way). Keys here are arbitrary: the contract knows nothing of
the registry's layout.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.errors import DigestInvalid, SizeInvalid
from proxy.reference import Digest
from proxy.storage.driver.base import StorageDriver

MiB = 1 << 20


async def read_all(driver: StorageDriver, key: str, start: int = 0, end: int | None = None
                   ) -> bytes:
    return b"".join([chunk async for chunk in driver.read(key, start, end)])


async def data_of(driver: StorageDriver, key: str) -> bytes | None:
    got = await driver.get(key)
    return None if got is None else got.data


async def settled(driver: StorageDriver) -> None:
    """Let what a driver finishes in the background (S3's use records) land."""
    settle = getattr(driver, "settle", None)
    if settle is not None:
        await settle()


async def until(check: Callable[[], Awaitable[bool]], wait: float = 10.0) -> None:
    deadline = time.monotonic() + wait
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def clock_past(mtime: float) -> None:
    """Wait until the clock is a second past ``mtime``, and in the next second of it (S3
    times have 1 s steps), so that anything written now has a later mtime."""
    await asyncio.sleep(max(0.0, mtime + 1.0 - time.time(), int(mtime) + 1.05 - time.time()))


class DriverContract:
    """Tests every driver passes; subclasses provide the ``driver`` fixture."""

    # -- absent keys ---------------------------------------------------------------------

    async def test_an_absent_key_is_none_or_nothing_never_an_error(self, driver: StorageDriver):
        assert await driver.stat("no/such/key") is None
        assert await driver.stat("no/such/key", last_use=True) is None
        assert await driver.get("no/such/key") is None
        assert await driver.list("no/such") == []
        assert [e async for e in driver.walk("no/such")] == []
        await driver.delete("no/such/key")
        await driver.touch("no/such/key")
        await driver.move("no/such", "elsewhere")
        assert await driver.stat("elsewhere") is None
        with pytest.raises(FileNotFoundError):
            await read_all(driver, "no/such/key")

    async def test_a_directory_is_no_object(self, driver: StorageDriver):
        await driver.put("dir/sub/object", b"x")
        assert await driver.stat("dir/sub") is None
        assert await driver.get("dir/sub") is None

    # -- small objects -------------------------------------------------------------------

    async def test_put_then_get_and_stat(self, driver: StorageDriver):
        before = time.time()
        await driver.put("a/b/small", b"hello")
        got = await driver.get("a/b/small")
        assert got is not None and got.data == b"hello"
        assert before - 2 <= got.mtime <= time.time() + 2
        info = await driver.stat("a/b/small")
        assert info is not None and info.size == 5 and abs(info.mtime - got.mtime) < 1.5
        await driver.put("a/b/small", b"replaced, longer")
        got = await driver.get("a/b/small")
        assert got is not None and got.data == b"replaced, longer"
        await driver.put("a/b/empty", b"")
        got = await driver.get("a/b/empty")
        assert got is not None and got.data == b""

    async def test_a_put_of_the_same_bytes_refreshes_the_mtime(self, driver: StorageDriver):
        await driver.put("tag", b"sha256:abc")
        first = await driver.stat("tag")
        assert first is not None
        await clock_past(first.mtime)
        await driver.put("tag", b"sha256:abc")
        again = await driver.get("tag")
        assert again is not None and again.data == b"sha256:abc"
        assert again.mtime > first.mtime

    async def test_mark_creates_an_empty_object(self, driver: StorageDriver):
        await driver.mark("repo/_links/sha256/abc")
        await driver.mark("repo/_links/sha256/abc")  # idempotent
        info = await driver.stat("repo/_links/sha256/abc")
        assert info is not None and info.size == 0

    async def test_delete_removes_only_its_key(self, driver: StorageDriver):
        await driver.put("d/one", b"1")
        await driver.put("d/two", b"2")
        await driver.delete("d/one")
        await driver.delete("d/one")  # absent: no error
        assert await driver.stat("d/one") is None
        assert await data_of(driver, "d/two") == b"2"

    # -- big objects ---------------------------------------------------------------------

    async def test_read_returns_exact_ranges(self, driver: StorageDriver):
        data = os.urandom(3 * MiB + 123)
        await driver.put("big", data)
        assert await read_all(driver, "big") == data
        for start, end in [(0, 1), (0, 100), (MiB - 10, MiB + 10), (len(data) - 1, len(data)),
                           (1000, len(data) + 5000), (7, None)]:
            assert await read_all(driver, "big", start, end) == data[start:end], (start, end)
        assert await read_all(driver, "big", 10, 10) == b""
        assert await read_all(driver, "big", len(data) + 10, len(data) + 20) == b""

    async def test_local_path_is_the_object_on_local_drivers_only(self, driver: StorageDriver):
        await driver.put("lp/object", b"local bytes")
        path = driver.local_path("lp/object")
        if driver.local:
            assert path is not None
            assert Path(path).read_bytes() == b"local bytes"  # noqa: ASYNC240
        else:
            assert path is None

    async def test_writer_verifies_and_publishes_on_commit(self, driver: StorageDriver):
        data = os.urandom(2 * MiB + 7)
        digest = Digest.of(data)
        writer = driver.writer("w/ok", digest.algorithm)
        for i in range(0, len(data), 256 * 1024):
            await writer.write(data[i:i + 256 * 1024])
        assert await driver.stat("w/ok") is None  # nothing visible before the commit
        await writer.commit(digest, len(data))
        info = await driver.stat("w/ok")
        assert info is not None and info.size == len(data)
        assert await read_all(driver, "w/ok") == data

    async def test_a_writer_refuses_a_wrong_digest_or_size(self, driver: StorageDriver):
        data = os.urandom(MiB)
        writer = driver.writer("w/bad-digest")
        await writer.write(data)
        with pytest.raises(DigestInvalid):
            await writer.commit(Digest.of(b"something else"), len(data))
        writer = driver.writer("w/bad-size")
        await writer.write(data)
        with pytest.raises(SizeInvalid):
            await writer.commit(Digest.of(data), len(data) + 1)
        unverified = driver.writer("w/bad-size-unverified", verify=False)
        await unverified.write(data)
        with pytest.raises(SizeInvalid):
            await unverified.commit(Digest.of(data), len(data) - 1)
        for key in ("w/bad-digest", "w/bad-size", "w/bad-size-unverified"):
            assert await driver.stat(key) is None
        assert await driver.list("w") == []

    async def test_an_unverifying_writer_checks_only_the_size(self, driver: StorageDriver):
        data = b"the caller hashed these bytes itself"
        writer = driver.writer("w/trusted", verify=False)
        await writer.write(data)
        await writer.commit(Digest.of(b"not checked here"), len(data))
        assert await read_all(driver, "w/trusted") == data

    async def test_an_aborted_writer_leaves_nothing(self, driver: StorageDriver):
        writer = driver.writer("w/aborted")
        await writer.write(os.urandom(MiB))
        await writer.abort()
        await writer.abort()  # idempotent
        assert await driver.stat("w/aborted") is None
        assert await driver.list("w") == []

    async def test_publish_file_makes_a_verified_file_the_object(self, driver: StorageDriver,
                                                                 tmp_path: Path):
        data = os.urandom(MiB + 5)
        path = tmp_path / "upload"
        path.write_bytes(data)
        await driver.publish_file(path, "p/object", Digest.of(data), len(data))
        assert await read_all(driver, "p/object") == data

    # -- listing -------------------------------------------------------------------------

    async def test_list_names_what_is_directly_under_a_prefix(self, driver: StorageDriver):
        for key in ("l/a", "l/b/c", "l/b/d/e", "lx/not-under-l"):
            await driver.put(key, b"x")
        assert sorted(await driver.list("l")) == ["a", "b"]
        assert sorted(await driver.list("l/b")) == ["c", "d"]
        assert await driver.list("l/a") == []  # an object has nothing under it

    async def test_walk_yields_directories_before_their_objects(self, driver: StorageDriver):
        for key, data in (("t/x/1", b"1"), ("t/x/y/2", b"22"), ("t/z/3", b"333"),
                          ("t/_skip/4", b"4"), ("t/z/_skip/5", b"5")):
            await driver.put(key, data)
        seen = [e async for e in driver.walk("t")]
        keys = [k for k, _ in seen]
        assert {k: i.size for k, i in seen if i is not None} == {
            "t/x/1": 1, "t/x/y/2": 2, "t/z/3": 3, "t/_skip/4": 1, "t/z/_skip/5": 1}
        assert {k for k, i in seen if i is None} == {"t/x", "t/x/y", "t/z", "t/_skip",
                                                     "t/z/_skip"}
        for key in keys:
            parent = key.rpartition("/")[0]
            if parent != "t":
                assert keys.index(parent) < keys.index(key), (parent, key)
        pruned = [e async for e in driver.walk(
            "t", prune=lambda k: k.rpartition("/")[2].startswith("_"))]
        assert sorted(k for k, _ in pruned) == ["t/_skip", "t/x", "t/x/1", "t/x/y", "t/x/y/2",
                                                "t/z", "t/z/3", "t/z/_skip"]

    async def test_move_merges_into_what_is_there(self, driver: StorageDriver):
        await driver.put("m/old/_a/1", b"moved")
        await driver.put("m/old/_a/2", b"loses")
        await driver.put("m/old/_a/deep/3", b"deep")
        await driver.put("m/old/nested/_a/4", b"stays")
        await driver.put("m/new/_a/2", b"wins")
        await driver.move("m/old/_a", "m/new/_a")
        got = {k: await data_of(driver, k) async for k, i in driver.walk("m") if i is not None}
        assert got == {"m/new/_a/1": b"moved", "m/new/_a/2": b"wins",
                       "m/new/_a/deep/3": b"deep", "m/old/nested/_a/4": b"stays"}
        # emptied directories went too (S3 has none but what its keys imply)
        assert {k async for k, _ in driver.walk("m/old")} == {
            "m/old/nested", "m/old/nested/_a", "m/old/nested/_a/4"}
        await driver.move("m/old/nested/_a", "m/new/nested/_a")
        assert not [k async for k, _ in driver.walk("m") if k.startswith("m/old")]

    # -- last use ------------------------------------------------------------------------

    async def test_touch_records_a_use(self, driver: StorageDriver):
        await driver.put("u/object", b"used")
        written = await driver.stat("u/object")
        assert written is not None
        await clock_past(written.mtime)
        await driver.touch("u/object")
        await settled(driver)

        async def used() -> bool:
            info = await driver.stat("u/object", last_use=True)
            return info is not None and info.mtime > written.mtime

        await until(used)
        walked = {k: i async for k, i in driver.walk("u", last_use=True)}
        assert walked["u/object"] is not None and walked["u/object"].mtime > written.mtime
        got = await driver.get("u/object")
        assert got is not None and got.data == b"used"

    # -- the rest ------------------------------------------------------------------------

    async def test_a_url_when_given_serves_the_object(self, driver: StorageDriver):
        await driver.put("url/object", b"fetched directly")
        url = await driver.url("url/object")
        if url is None:
            return
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200 and await resp.read() == b"fetched directly"

    async def test_check_answers(self, driver: StorageDriver):
        assert await driver.check() is None

    async def test_purge_incomplete_spares_young_writes(self, driver: StorageDriver):
        data = os.urandom(MiB)
        writer = driver.writer("pi/object")
        await writer.write(data)
        assert await driver.purge_incomplete(time.time() - 3600) == 0
        await writer.commit(Digest.of(data), len(data))
        assert await read_all(driver, "pi/object") == data
