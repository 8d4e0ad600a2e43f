"""The fill machinery in process: waking readers as bytes arrive, the threaded write
pipeline, and the keyed locks single flight is built on."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import pytest

from proxy.pullthrough import fill as fill_mod
from proxy.pullthrough.fill import NOTIFY_DELAY, BlobFill
from proxy.reference import Digest
from proxy.singleflight import KeyedLocks
from proxy.storage.backend import open_filesystem


async def test_fill_readers_are_woken_soon_after_bytes_arrive_even_between_steps(tmp_path):
    """Readers are woken per MiB, or NOTIFY_DELAY after the last wake-up: bytes that arrive
    just after one and are followed by a pause must not wait for the next chunk."""
    _, store = open_filesystem(tmp_path)
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


@pytest.mark.parametrize("fails", [False, True], ids=["written", "write-error"])
def test_the_fill_pipeline_settles_a_batch_whose_callback_is_still_queued(tmp_path, fails):
    """The thread finished a batch (or failed it: ENOSPC) and its done-callback is queued
    behind the fill task: awaiting the done future returns without yielding, so the fill
    must settle it itself (it spun forever once). Run in a thread: a spinning loop would
    never reach a timeout."""
    _, store = open_filesystem(tmp_path)
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
