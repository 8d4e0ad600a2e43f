"""Coalescing of concurrent identical work: the first caller runs it, the others await it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
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
