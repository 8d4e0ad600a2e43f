"""Short-term, in-process statistics for the status page: hit ratio per minute over the
last hours, and bytes served per repository. (Prometheus has the long-term numbers.)"""

from __future__ import annotations

import time
from collections import Counter, deque

#: Minutes of hit-ratio history kept.
HISTORY_MINUTES = 6 * 60


#: Outcomes answered from the cache (a revalidated or refreshing tag included).
CACHE_OUTCOMES = ("hit", "revalidated", "refreshing")


def served_from_cache(outcomes: Counter[str]) -> int:
    """How many of ``outcomes`` were answered from the cache."""
    return sum(outcomes[o] for o in CACHE_OUTCOMES)


class Stats:
    """Per-minute cache outcomes and bytes per repository of this process."""

    def __init__(self) -> None:
        self.started = time.time()
        self._minutes: deque[tuple[int, Counter[str]]] = deque(maxlen=HISTORY_MINUTES)
        self.bytes_by_repo: Counter[str] = Counter()

    def record(self, repo: str | None, outcome: str, sent: int, *, requests: int = 1,
               now: float | None = None) -> None:
        """Count ``requests`` answers with ``outcome`` that sent ``sent`` bytes in all."""
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
        series = []
        for m in range(now - minutes + 1, now + 1):
            c = by_minute.get(m)
            total = sum(c.values()) if c else 0
            hits = served_from_cache(c) if c else 0
            series.append((m, hits / total if total else None))
        return series

    def totals(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for _, c in self._minutes:
            out.update(c)
        return out


STATS = Stats()
