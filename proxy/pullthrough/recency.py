"""Recording uses of stored objects (their last use orders LRU eviction), throttled: a hot
blob or manifest is read thousands of times a minute, and one write per object per
``interval`` and process is plenty for an order kept in minutes."""

from __future__ import annotations

import time

from proxy.bounded import BoundedDict
from proxy.reference import Digest
from proxy.storage import Store


class Recency:
    """Touches objects of ``store`` at most once per ``interval`` seconds each."""

    def __init__(self, store: Store, interval: float = 30.0) -> None:
        self._store = store
        self.interval = interval
        self._touched: BoundedDict[Digest, float] = BoundedDict(200_000)

    def due(self, digest: Digest) -> bool:
        """Whether this process should record a use of ``digest`` now; remembers that it
        will."""
        now = time.monotonic()
        last = self._touched.get(digest)
        if last is not None and now - last < self.interval:
            return False
        self._touched[digest] = now
        return True

    async def touch(self, digest: Digest) -> None:
        """Record a use of ``digest``, unless one was recorded less than ``interval`` ago."""
        if self.due(digest):
            await self._store.touch_blob(digest)

    def forget(self, digests: list[Digest]) -> None:
        """Forget the uses of objects that were evicted (one stored again is new)."""
        for digest in digests:
            self._touched.pop(digest, None)
