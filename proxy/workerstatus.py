"""The status page's figures of every worker, not only of the one that answers.

Each worker counts in its own memory (:mod:`proxy.stats`, its evictor, its upstream
clients). At the metrics flush (once a second, and only when something changed) it writes
them to ``status-<pid>.json`` in the directory the workers share for their metrics
samples; the worker rendering the page adds its own current figures to the others' files.
No request waits for a file: the files lag by a second at most.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from proxy.pullthrough.evictor import Evictor
from proxy.routing import Router
from proxy.stats import STATS, Stats
from proxy.timeseries import SERIES, TimeSeries
from proxy.upstreamactivity import ACTIVITY
from proxy.upstreamactivity import combine as combine_activity

log = logging.getLogger("regproxy.status")

FILE_PREFIX = "status-"
#: Evictions each worker reports (the page shows the last 20 of all workers).
RECENT_EVICTIONS = 20
#: Seconds between publications of the time series (the others' figures are then that
#: much behind; the answering worker's are current): a full week serialises in ~10 ms.
SERIES_INTERVAL = 10.0
#: Breaker states from the least to the most alarming: the page shows the worst.
_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


class WorkerStatus:
    """This worker's figures, published to ``directory`` (``None``: a single process)."""

    def __init__(self, directory: Path | None, router: Router, evictor: Evictor, *,
                 data_root: Path) -> None:
        self.directory = directory
        self.data_root = data_root
        self.router = router
        self.evictor = evictor
        self._published: tuple[object, ...] | None = None
        #: The time series as last published, when, and at which change count.
        self._series: dict[str, Any] | None = None
        self._series_at = 0.0
        self._series_seen = -1

    def figures(self, series: dict[str, Any] | None = None) -> dict[str, Any]:
        """This worker's figures as of now (JSON-able); ``series``: the time series to
        give instead of the current ones."""
        ev = self.evictor
        report = ev.last_report
        cache = None if report is None else {
            "time": ev.reported_at, "evictable": report.remaining_bytes,
            "shared": report.shared_bytes, "hosted": report.hosted_bytes}
        return {
            "pid": os.getpid(), **STATS.export(), "cache": cache,
            "series": SERIES.export() if series is None else series,
            "activity": ACTIVITY.export(),
            "evictions": [list(e) for e in ev.recent[-RECENT_EVICTIONS:]],
            "upstreams": {u.name: {"breaker": u.breaker.state.value,
                                   "ratelimit_remaining": u.ratelimit_remaining,
                                   "urls": {url: state.value for url, state in u.url_states()}}
                          for u in self.router.upstreams},
        }

    def _version(self) -> tuple[object, ...]:
        """Changes whenever :meth:`figures` would (cheap: asked at every flush)."""
        return (STATS.changes, self._series_at, ACTIVITY.changes, self.evictor.reported_at,
                len(self.evictor.recent),
                *(state for u in self.router.upstreams for _, state in u.url_states()),
                *(u.ratelimit_remaining for u in self.router.upstreams))

    def publish(self) -> None:
        """Write this worker's figures for the others, if they changed (a metrics source)."""
        if self.directory is None:
            return
        now = time.monotonic()
        if self._series is None or (SERIES.changes != self._series_seen
                                    and now - self._series_at >= SERIES_INTERVAL):
            self._series, self._series_at, self._series_seen = SERIES.export(), now, SERIES.changes
        version = self._version()
        if version == self._published:
            return
        path = self.directory / f"{FILE_PREFIX}{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        try:  # (no fsync: figures lost in a crash are lost with the process anyway)
            tmp.write_text(json.dumps(self.figures(self._series)))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot publish the status figures to %s: %s", path, exc.strerror)
            return
        self._published = version

    def disk(self) -> dict[str, int] | None:
        """Free and total bytes of the data volume (``None``: it cannot be asked)."""
        try:
            st = os.statvfs(self.data_root)
        except OSError:
            return None
        return {"free": st.f_bavail * st.f_frsize, "size": st.f_blocks * st.f_frsize}

    def gather(self) -> list[dict[str, Any]]:
        """Every worker's figures: this one's as of now, the others' as last published."""
        own = self.figures()
        if self.directory is None:
            return [own]
        parts = [own]
        for path in self.directory.glob(f"{FILE_PREFIX}*.json"):
            if path.name == f"{FILE_PREFIX}{own['pid']}.json":
                continue
            with contextlib.suppress(OSError, ValueError):  # a worker's file going away
                parts.append(json.loads(path.read_text()))
        return parts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of several workers as one: counts summed, the newest eviction report,
    the worst breaker state and the lowest rate limit left among live workers. Workers
    that exited keep counting in the sums (as their counters do in ``/metrics``)."""
    stats = Stats.combine(parts)
    reports = [p["cache"] for p in parts if p.get("cache")]
    evictions = sorted((e for p in parts for e in p["evictions"]), key=lambda e: e[0])
    upstreams: dict[str, dict[str, Any]] = {}
    for part in parts:
        if part is not parts[0] and not _alive(int(part["pid"])):
            continue
        for name, up in part["upstreams"].items():
            seen = upstreams.setdefault(name, {**up, "urls": {}})
            if _SEVERITY.get(up["breaker"], 0) > _SEVERITY.get(seen["breaker"], 0):
                seen["breaker"] = up["breaker"]
            urls = seen["urls"]
            for url, state in up.get("urls", {}).items():  # (each URL: its worst state too)
                if _SEVERITY.get(state, 0) >= _SEVERITY.get(urls.get(url, ""), 0):
                    urls[url] = state
            left = [v for v in (seen["ratelimit_remaining"], up["ratelimit_remaining"])
                    if v is not None]
            seen["ratelimit_remaining"] = min(left, key=_as_number) if left else None
    return {
        "stats": stats,
        "series": TimeSeries.combine(p.get("series") for p in parts),
        "activity": combine_activity(p.get("activity") for p in parts),
        "cache": max(reports, key=lambda r: r["time"]) if reports else None,
        "evictions": evictions[-RECENT_EVICTIONS:],
        "upstreams": upstreams,
        "workers": [{"pid": p["pid"], "started": p["started"],
                     "cache_reads": sum(n for _, c in p["minutes"] for n in c.values())}
                    for p in parts],
    }


def _as_number(value: str) -> float:
    """A ``ratelimit-remaining`` value such as ``"97;w=21600"`` as a number."""
    try:
        return float(str(value).split(";")[0])
    except ValueError:
        return float("inf")
