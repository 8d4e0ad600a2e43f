"""What each upstream did, for the console: requests by status, errors by kind, the time
of the last success and of the last failure (with its kind), and whether it was ever
contacted ("never contacted" is no "healthy").

Read from the upstream client's own Prometheus counters once a second (at the metrics
flush): a counter that grew since the last look is an event of that second. So the
upstream client needs no hook of its own, and the figures are per worker, published with
the status figures and merged on read (:func:`combine`).

The latency of each upstream (time to its response headers) is kept as a
:class:`~proxy.timeseries.TimeSeries` of its own, from the growth of the
``regproxy_upstream_latency_seconds`` histogram: every bucket bound of that histogram is a
bound of :data:`~proxy.metrics.LATENCY_BUCKETS`, so its counts land in those buckets as
they are (a percentile is read at the upstream histogram's resolution).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from proxy import metrics
from proxy.metrics import LATENCY_BUCKETS
from proxy.timeseries import TimeSeries, make_row


def _histogram(metric: Any) -> dict[str, list[float]]:
    """``upstream -> cumulative counts per LATENCY_BUCKETS bucket (+Inf last)`` of the
    upstream latency histogram in this process."""
    out: dict[str, list[float]] = {}
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            le = sample.labels["le"]
            index = len(LATENCY_BUCKETS) if le == "+Inf" else LATENCY_BUCKETS.index(float(le))
            row = out.setdefault(sample.labels["upstream"], [0.0] * (len(LATENCY_BUCKETS) + 1))
            row[index] = sample.value
    for row in out.values():  # (bounds it lacks: the cumulative count of the one below)
        for i in range(1, len(row)):
            row[i] = max(row[i], row[i - 1])
    return out


def _samples(metric: Any) -> dict[tuple[str, ...], float]:
    """``labels -> value`` of a counter's ``_total`` samples in this process."""
    out: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[tuple(sample.labels.values())] = sample.value
    return out


class UpstreamActivity:
    """This process's view of its upstreams, updated by :meth:`fold`."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, ...], float] = {}
        self._errors: dict[tuple[str, ...], float] = {}
        self._bytes: dict[tuple[str, ...], float] = {}
        self._latency: dict[str, list[float]] = {}
        #: upstream -> its latencies over time (the console's upstream charts)
        self.latency: dict[str, TimeSeries] = {}
        #: upstream -> {"requests": {status: n}, "errors": {kind: n}, "last_success": t,
        #: "last_failure": t, "last_failure_reason": str}
        self.upstreams: dict[str, dict[str, Any]] = {}
        self.changes = 0
        #: Blob bytes fetched from upstreams since the last :meth:`take_bytes`.
        self._new_bytes = 0.0

    def _entry(self, name: str) -> dict[str, Any]:
        return self.upstreams.setdefault(name, {
            "requests": {}, "errors": {}, "last_success": None, "last_failure": None,
            "last_failure_reason": None})

    def fold(self, now: float | None = None) -> None:
        """Turn the counters' growth since the last call into events at ``now``."""
        t = time.time() if now is None else now
        requests = _samples(metrics.UPSTREAM_REQUESTS)
        for (name, _method, status), value in requests.items():
            grown = value - self._requests.get((name, _method, status), 0.0)
            if grown <= 0:
                continue
            self.changes += 1
            up = self._entry(name)
            up["requests"][status] = up["requests"].get(status, 0) + int(grown)
            code = int(status) if status.isdigit() else 0
            if code >= 500 or code == 429:
                up["last_failure"], up["last_failure_reason"] = t, f"HTTP {status}"
            else:
                up["last_success"] = t
        self._requests = requests
        errors = _samples(metrics.UPSTREAM_ERRORS)
        for (name, kind), value in errors.items():
            grown = value - self._errors.get((name, kind), 0.0)
            if grown <= 0:
                continue
            self.changes += 1
            up = self._entry(name)
            up["errors"][kind] = up["errors"].get(kind, 0) + int(grown)
            up["last_failure"], up["last_failure_reason"] = t, kind
        self._errors = errors
        latency = _histogram(metrics.UPSTREAM_LATENCY)
        for name, cumulative in latency.items():
            before = self._latency.get(name, [0.0] * len(cumulative))
            since = [max(0, int(c - b)) for c, b in zip(cumulative, before, strict=True)]
            counts = [since[0]] + [max(0, since[i] - since[i - 1]) for i in range(1, len(since))]
            if any(counts):
                self.changes += 1
                self.latency.setdefault(name, TimeSeries()).add(
                    make_row(requests=sum(counts), latency=counts), now=t)
        self._latency = latency
        fetched = _samples(metrics.UPSTREAM_BYTES)
        for labels, value in fetched.items():
            self._new_bytes += max(0.0, value - self._bytes.get(labels, 0.0))
        self._bytes = fetched

    def take_bytes(self) -> int:
        """Upstream blob bytes fetched since the last call (for the time series)."""
        n, self._new_bytes = int(self._new_bytes), 0.0
        return n

    def export(self) -> dict[str, Any]:
        return {name: {**up, "latency": self.latency[name].export() if name in self.latency
                       else None} for name, up in self.upstreams.items()}


def combine(parts: Iterable[dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Several workers' :meth:`UpstreamActivity.export` as one: counts summed, the latest
    success and failure, the latencies as one :class:`TimeSeries`."""
    out: dict[str, dict[str, Any]] = {}
    latency: dict[str, list[Any]] = {}
    for part in parts:
        for name, up in (part or {}).items():
            latency.setdefault(name, []).append(up.get("latency"))
            seen = out.setdefault(name, {"requests": Counter(), "errors": Counter(),
                                         "last_success": None, "last_failure": None,
                                         "last_failure_reason": None})
            seen["requests"].update(up.get("requests", {}))
            seen["errors"].update(up.get("errors", {}))
            if up.get("last_success") and (seen["last_success"] or 0) < up["last_success"]:
                seen["last_success"] = up["last_success"]
            if up.get("last_failure") and (seen["last_failure"] or 0) < up["last_failure"]:
                seen["last_failure"] = up["last_failure"]
                seen["last_failure_reason"] = up.get("last_failure_reason")
    for name, up in out.items():
        up["requests"], up["errors"] = dict(up["requests"]), dict(up["errors"])
        up["latency"] = TimeSeries.combine(latency[name])
    return out


ACTIVITY = UpstreamActivity()
