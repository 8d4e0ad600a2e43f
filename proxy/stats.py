"""Short-term statistics for the status page: hit ratio per minute over the last hours, and
bytes served per repository. Each process counts its own; :meth:`Stats.combine` adds up
several workers' (see :mod:`proxy.workerstatus`). (Prometheus has the long-term numbers.)"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

from proxy.results import CacheOutcome

#: Minutes of hit-ratio history kept.
HISTORY_MINUTES = 6 * 60
#: Repositories kept by :meth:`Stats.export` (the page shows the top ten).
EXPORTED_REPOSITORIES = 200


#: Outcomes answered from the cache (a revalidated or refreshing tag included).
CACHE_OUTCOMES = (CacheOutcome.HIT, CacheOutcome.REVALIDATED, CacheOutcome.REFRESHING)
#: Outcomes left out of the hit ratio: a name that exists nowhere is no cache read.
UNCOUNTED_OUTCOMES = (CacheOutcome.NOT_FOUND,)


def served_from_cache(outcomes: Counter[str]) -> int:
    """How many of ``outcomes`` were answered from the cache."""
    return sum(outcomes[o] for o in CACHE_OUTCOMES)


def hit_ratio(outcomes: Counter[str]) -> float | None:
    """The share of cache reads answered from the cache (``None``: no reads)."""
    reads = sum(n for o, n in outcomes.items() if o not in UNCOUNTED_OUTCOMES)
    return served_from_cache(outcomes) / reads if reads else None


class Stats:
    """Per-minute cache outcomes and bytes per repository of this process."""

    def __init__(self) -> None:
        self.started = time.time()
        self._minutes: deque[tuple[int, Counter[str]]] = deque(maxlen=HISTORY_MINUTES)
        self.bytes_by_repo: Counter[str] = Counter()
        #: Bumped by every :meth:`record`: whether there is anything new to publish.
        self.changes = 0

    def record(self, repo: str | None, outcome: str | None, sent: int, *, requests: int = 1,
               now: float | None = None) -> None:
        """Count ``requests`` answers with ``outcome`` (``None``: not a cache read, bytes
        only) that sent ``sent`` bytes in all."""
        self.changes += 1
        if outcome is not None:
            minute = int((time.time() if now is None else now) // 60)
            if not self._minutes or self._minutes[-1][0] != minute:
                self._minutes.append((minute, Counter()))
            self._minutes[-1][1][outcome] += requests
        if repo is not None and sent > 0:
            self.bytes_by_repo[repo] += sent
            if len(self.bytes_by_repo) > 10_000:  # keep the top ones only
                self.bytes_by_repo = Counter(dict(self.bytes_by_repo.most_common(1000)))

    def hit_ratio_series(self, minutes: int = HISTORY_MINUTES) -> list[tuple[int, float | None]]:
        """``(minute, ratio)`` for the last ``minutes``; ``None`` where nothing was served."""
        now = int(time.time() // 60)
        by_minute = dict(self._minutes)
        return [(m, hit_ratio(by_minute.get(m, Counter())))
                for m in range(now - minutes + 1, now + 1)]

    def totals(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for _, c in self._minutes:
            out.update(c)
        return out

    def export(self) -> dict[str, Any]:
        """The figures as JSON-able data, for :meth:`combine` in another process."""
        return {"started": self.started,
                "minutes": [[m, dict(c)] for m, c in self._minutes],
                "bytes_by_repo": dict(self.bytes_by_repo.most_common(EXPORTED_REPOSITORIES))}

    @classmethod
    def combine(cls, exported: Iterable[dict[str, Any]]) -> Stats:
        """The sum of several processes' :meth:`export` figures (started: the earliest)."""
        out = cls()
        minutes: dict[int, Counter[str]] = {}
        for part in exported:
            out.started = min(out.started, float(part["started"]))
            for minute, counts in part["minutes"]:
                minutes.setdefault(int(minute), Counter()).update(counts)
            out.bytes_by_repo.update(part["bytes_by_repo"])
        for minute in sorted(minutes)[-HISTORY_MINUTES:]:
            out._minutes.append((minute, minutes[minute]))
        return out


STATS = Stats()
