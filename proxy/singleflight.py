"""Coalescing of concurrent identical work (the first caller runs it, the others await it)
and per-key mutual exclusion."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Run at most one ``fn()`` per key at a time; concurrent callers share its result.

    The work runs in its own task, so one caller's cancellation (a client that hangs up)
    does not cancel it for the others.
    """

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[T]] = {}

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Return ``(result, shared)``; ``shared`` is True for callers that joined."""
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut), True
        task = asyncio.ensure_future(fn())
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task), False

    def running(self) -> list[asyncio.Future[T]]:
        """The work in flight now (cancelling a caller does not stop it: shutdown does)."""
        return list(self._inflight.values())


class KeyedLocks:
    """One :class:`asyncio.Lock` per key, kept only while someone holds or waits for it
    (so the table cannot grow with the keys ever seen)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the ``async with`` body."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
