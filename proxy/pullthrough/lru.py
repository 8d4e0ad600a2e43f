"""A byte-bounded LRU for manifests held in memory (hot tags are served without disk I/O)."""

from __future__ import annotations

from collections import OrderedDict

from proxy.storage import StoredManifest


class ManifestLRU:
    """Keeps the most recently used manifests up to ``max_bytes`` of manifest bodies."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredManifest] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> StoredManifest | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, item: StoredManifest) -> None:
        key = str(item.digest)
        if key in self._items or len(item.data) > self.max_bytes:
            return
        self._items[key] = item
        self._bytes += len(item.data)
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old.data)

    def discard(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= len(item.data)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0
