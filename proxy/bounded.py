"""A dict that cannot grow with the keys ever seen: the memo and throttle tables of the
hot paths (routes, tags, recency, metric children)."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(dict[K, V]):
    """Starts over (empties itself) when a new key would take it past ``limit`` entries.

    What it holds can always be recomputed, so forgetting all of it at once is cheaper
    than tracking an order: reads stay plain ``dict`` lookups, with no Python code per read.
    Only item assignment is bounded (``setdefault`` and ``update`` are not). (No
    ``__slots__``: on a dict subclass they make every ``get`` ~50 % slower.)
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        if len(self) >= self.limit and key not in self:
            self.clear()
        super().__setitem__(key, value)
