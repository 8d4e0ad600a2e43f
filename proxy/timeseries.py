"""The console's time series: a small ring buffer per worker at three resolutions (10 s
buckets for 15 minutes, 1 min for 6 hours, 10 min for 7 days), so the overview charts need
no external database. Fed once a second by the access log's fold (with the request counts
the metrics get), published with the worker's status figures and summed on read
(:meth:`TimeSeries.combine`), like :class:`proxy.stats.Stats`.

A bucket holds counts only (requests, cache hits and misses, bytes, and the client
latencies as counts per bucket of :data:`proxy.metrics.LATENCY_BUCKETS`), so buckets of
several workers add up and percentiles are read from the summed histogram.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from proxy.metrics import LATENCY_BUCKETS

#: Window name -> (bucket seconds, buckets kept).
WINDOWS: dict[str, tuple[int, int]] = {"15m": (10, 90), "6h": (60, 360), "7d": (600, 1008)}
#: The counts of a bucket, in this order, then one count per latency bucket.
FIELDS = ("requests", "hits", "misses", "bytes_cache", "bytes_upstream", "upstream_bytes")
_N = len(FIELDS)
_SIZE = _N + len(LATENCY_BUCKETS) + 1


class TimeSeries:
    """This process's counts per time bucket, at every resolution of :data:`WINDOWS`."""

    def __init__(self) -> None:
        self._rings: dict[str, deque[tuple[int, list[int]]]] = {
            w: deque(maxlen=n) for w, (_, n) in WINDOWS.items()}
        #: Bumped by every :meth:`add`: whether there is anything new to publish.
        self.changes = 0

    def add(self, counts: Sequence[int], now: float | None = None) -> None:
        """Add one row of counts (:data:`FIELDS` then the latency buckets) at ``now``."""
        if not any(counts):
            return
        t = time.time() if now is None else now
        self.changes += 1
        for window, (step, _) in WINDOWS.items():
            ring = self._rings[window]
            start = int(t // step) * step
            if not ring or ring[-1][0] < start:
                ring.append((start, [0] * _SIZE))
            elif ring[-1][0] > start:  # (a clock step back: count it in the newest bucket)
                start = ring[-1][0]
            row = ring[-1][1]
            for i, n in enumerate(counts):
                row[i] += n

    def buckets(self, window: str) -> list[tuple[int, list[int]]]:
        return list(self._rings[window])

    def export(self) -> dict[str, Any]:
        """JSON-able, for :meth:`combine` in another process (integers only: ~10 ms to
        serialise a full week)."""
        return {w: [[s, row] for s, row in ring] for w, ring in self._rings.items()}

    @classmethod
    def combine(cls, exported: Iterable[dict[str, Any] | None]) -> TimeSeries:
        """The sum of several processes' :meth:`export` figures."""
        out = cls()
        parts = list(exported)
        for window, (_, keep) in WINDOWS.items():
            sums: dict[int, list[int]] = {}
            for part in parts:
                for start, row in (part or {}).get(window, []):
                    acc = sums.setdefault(int(start), [0] * _SIZE)
                    for i, n in enumerate(row[:_SIZE]):
                        acc[i] += int(n)
            for start in sorted(sums)[-keep:]:
                out._rings[window].append((start, sums[start]))
        return out

    def view(self, window: str, now: float | None = None) -> dict[str, Any]:
        """The window as chart columns on a unix-time axis: every bucket of the window
        (empty ones as zero counts, ratios and latencies ``None``), and the totals."""
        step, keep = WINDOWS[window]
        t = time.time() if now is None else now
        last = int(t // step) * step
        by_start = dict(self._rings[window])
        axis = list(range(last - (keep - 1) * step, last + step, step))
        empty = [0] * _SIZE
        cols: dict[str, list[Any]] = {k: [] for k in (
            "time", "requests_per_second", "hit_ratio", "bytes_cache", "bytes_upstream",
            "upstream_bytes", "p50_ms", "p99_ms")}
        total = [0] * _SIZE
        for start in axis:
            row = by_start.get(start, empty)
            for i, n in enumerate(row):
                total[i] += n
            # the current bucket is not over yet: a rate over its elapsed part
            span = min(step, max(t - start, 1.0)) if start == last else step
            cols["time"].append(start)
            cols["requests_per_second"].append(round(row[0] / span, 3))
            cols["hit_ratio"].append(_ratio(row))
            cols["bytes_cache"].append(int(row[3]))
            cols["bytes_upstream"].append(int(row[4]))
            cols["upstream_bytes"].append(int(row[5]))
            cols["p50_ms"].append(_quantile_ms(row, 0.5))
            cols["p99_ms"].append(_quantile_ms(row, 0.99))
        totals: dict[str, Any] = {name: int(total[i]) for i, name in enumerate(FIELDS)}
        totals.update(hit_ratio=_ratio(total), p50_ms=_quantile_ms(total, 0.5),
                      p99_ms=_quantile_ms(total, 0.99))
        return {"window": window, "step_seconds": step, "series": cols, "totals": totals}


def _ratio(row: Sequence[int]) -> float | None:
    reads = row[1] + row[2]
    return round(row[1] / reads, 4) if reads else None


def _quantile_ms(row: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a bucket's latency histogram, interpolated within the bucket
    it falls in (as Prometheus' ``histogram_quantile``); ``None`` without requests."""
    counts = row[_N:]
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            lower = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
            upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
            return round((lower + (upper - lower) * (rank - seen) / n) * 1000, 3)
        seen += n
    return round(LATENCY_BUCKETS[-1] * 1000, 3)


def make_row(requests: int = 0, hits: int = 0, misses: int = 0, bytes_cache: int = 0,
        bytes_upstream: int = 0, upstream_bytes: int = 0,
        latency: Sequence[int] = ()) -> list[int]:
    """A row of counts for :meth:`TimeSeries.add` (``latency``: counts per bucket)."""
    out = [requests, hits, misses, bytes_cache, bytes_upstream, upstream_bytes] + [0] * (_SIZE - _N)
    for i, n in enumerate(latency[:_SIZE - _N]):
        out[_N + i] = int(n)
    return out


#: Handler names whose requests the series leave out (the operational pages and probes:
#: a console polling itself is no traffic); filled in by :mod:`proxy.handlers`.
UNCOUNTED_HANDLERS: set[str] = set()

SERIES = TimeSeries()
