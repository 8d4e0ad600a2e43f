"""Prometheus metrics (prometheus-client).

With several workers, the parent calls :func:`share_between_processes` before it forks
them: each worker keeps its samples in files of that directory, and ``/metrics`` of any
worker sums every worker's.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from proxy import __version__
from proxy.bounded import BoundedDict

log = logging.getLogger("regproxy.metrics")

#: Upper bounds of the client request latency buckets: a manifest hit takes well under a
#: millisecond, a cold multi-GiB layer minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)


class BatchedHistogram(Histogram):
    """A histogram that takes many observations at once (:meth:`add`): the access log
    counts requests per bucket and adds them at the flush, so a request costs a bisect,
    not a locked write of a multi-process file per observation."""

    def add(self, bucket_counts: Sequence[int], total: float) -> None:
        """Add ``bucket_counts[i]`` observations to bucket ``i`` (the last: +Inf) whose
        values sum to ``total``. (prometheus-client has no such call; its histogram keeps
        one value per bucket and one for the sum, as used here.)"""
        for value, n in zip(self._buckets, bucket_counts, strict=True):
            if n:
                value.inc(n)
        self._sum.inc(total)


def latency_bucket(seconds: float) -> int:
    """The index of the :data:`LATENCY_BUCKETS` bucket (or +Inf) that ``seconds`` falls in."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


# The metrics are made by _define (at import, and again by share_between_processes).
REQUESTS: Counter
REQUEST_LATENCY: BatchedHistogram
CACHE: Counter
BYTES_SERVED: Counter
BYTES_SAVED: Counter
UPSTREAM_REQUESTS: Counter
UPSTREAM_ERRORS: Counter
UPSTREAM_LATENCY: Histogram
UPSTREAM_BYTES: Counter
FILLS: Counter
FILLS_IN_FLIGHT: Gauge
RANGED_PARTS: Counter
RANGED_RETRIES: Counter
RANGED_FALLBACKS: Counter
PREFETCHES: Counter
COLD_RANGES: Counter
BREAKER_OPEN: Gauge
RATELIMIT_REMAINING: Gauge
URL_BREAKER_OPEN: Gauge
UPSTREAM_QUEUE: Gauge
UPSTREAM_QUEUE_WAIT: Histogram
UPSTREAM_BUSY: Counter
CACHE_SIZE: Gauge
STORE_SIZE: Gauge
CACHE_BUDGET: Gauge
DISK_FREE: Gauge
DISK_SIZE: Gauge
EVICTIONS: Counter
EVICTED_BYTES: Counter
BUILD_INFO: Gauge


def _define() -> None:
    global REQUESTS, REQUEST_LATENCY, CACHE, BYTES_SERVED, BYTES_SAVED, UPSTREAM_REQUESTS
    global UPSTREAM_ERRORS, UPSTREAM_LATENCY, UPSTREAM_BYTES, FILLS, FILLS_IN_FLIGHT
    global BREAKER_OPEN, RATELIMIT_REMAINING, CACHE_SIZE, STORE_SIZE, CACHE_BUDGET, DISK_FREE
    global DISK_SIZE, EVICTIONS, EVICTED_BYTES, BUILD_INFO
    global RANGED_PARTS, RANGED_RETRIES, RANGED_FALLBACKS, PREFETCHES
    global URL_BREAKER_OPEN, UPSTREAM_QUEUE, UPSTREAM_QUEUE_WAIT, UPSTREAM_BUSY
    global COLD_RANGES
    REQUESTS = Counter("regproxy_requests_total", "HTTP requests answered",
                       ["route", "method", "status"])
    REQUEST_LATENCY = BatchedHistogram(
        "regproxy_request_duration_seconds",
        "Time from a client's request to the end of the response, by route and cache outcome",
        ["route", "cache"], buckets=LATENCY_BUCKETS)
    CACHE = Counter("regproxy_cache_requests_total",
                    "Manifest and blob reads of cached repositories by outcome (hit, miss, "
                    "coalesced, stale, not_found, error, ...)", ["kind", "outcome"])
    BYTES_SERVED = Counter("regproxy_bytes_served_total",
                           "Blob body bytes sent to clients, by where they came from "
                           "(cache, upstream, hosted)", ["source"])
    BYTES_SAVED = Counter("regproxy_bytes_saved_total",
                          "Manifest and blob bytes sent to clients of cached repositories "
                          "without an upstream transfer of their own (from the cache, or "
                          "joining another client's download)", ["kind"])
    UPSTREAM_REQUESTS = Counter("regproxy_upstream_requests_total", "Requests sent upstream",
                                ["upstream", "method", "status"])
    UPSTREAM_ERRORS = Counter("regproxy_upstream_errors_total",
                              "Upstream requests that failed without an answer (or breaker open)",
                              ["upstream", "kind"])
    UPSTREAM_LATENCY = Histogram("regproxy_upstream_latency_seconds",
                                 "Time to the upstream's response headers", ["upstream"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    UPSTREAM_BYTES = Counter("regproxy_upstream_bytes_total", "Blob bytes fetched from upstreams",
                             ["upstream"])
    FILLS = Counter("regproxy_fills_total",
                    "Blob downloads from upstreams into the store, by result (ok, failed, "
                    "cancelled: at shutdown)",
                    ["upstream", "result"])
    FILLS_IN_FLIGHT = Gauge("regproxy_fills_in_flight",
                            "Blob downloads from upstreams running now", ["upstream"],
                            multiprocess_mode="livesum")
    RANGED_PARTS = Counter("regproxy_fill_ranged_parts_total",
                           "Ranged GETs that fetched a part of a big blob (parallel fills)",
                           ["upstream"])
    RANGED_RETRIES = Counter("regproxy_fill_ranged_retries_total",
                             "Parts of parallel fills asked again after they failed",
                             ["upstream"])
    RANGED_FALLBACKS = Counter("regproxy_fill_ranged_fallbacks_total",
                               "Big blobs fetched as one stream because the upstream ignored "
                               "ranges", ["upstream"])
    PREFETCHES = Counter("regproxy_prefetch_blobs_total",
                         "Blobs of image manifests filled ahead of their clients (cache.prefetch): "
                         "started; requested (a client asked for it afterwards); unrequested "
                         "(no client asked within an hour)", ["outcome"])
    COLD_RANGES = Counter("regproxy_cold_ranges_total",
                          "Client ranges far ahead of a running fill, streamed from an "
                          "upstream ranged GET at once", ["upstream"])
    BREAKER_OPEN = Gauge("regproxy_circuit_breaker_open",
                         "1 while an upstream's breaker is open", ["upstream"],
                         multiprocess_mode="max")
    URL_BREAKER_OPEN = Gauge("regproxy_upstream_url_breaker_open",
                             "1 while the breaker of one URL of an upstream is open",
                             ["upstream", "url"], multiprocess_mode="max")
    UPSTREAM_QUEUE = Gauge("regproxy_upstream_queue_length",
                           "Requests waiting for a slot under an upstream's caps",
                           ["upstream"], multiprocess_mode="livesum")
    UPSTREAM_QUEUE_WAIT = Histogram("regproxy_upstream_queue_wait_seconds",
                                    "Time requests waited for a slot under an upstream's caps",
                                    ["upstream"],
                                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    UPSTREAM_BUSY = Counter("regproxy_upstream_busy_total",
                            "Requests answered 503 (with Retry-After) because an upstream's "
                            "caps were full and the queue full or the wait too long",
                            ["upstream"])
    RATELIMIT_REMAINING = Gauge("regproxy_upstream_ratelimit_remaining",
                                "Last ratelimit-remaining an upstream announced (Docker Hub)",
                                ["upstream"], multiprocess_mode="mostrecent")
    CACHE_SIZE = Gauge("regproxy_cache_size_bytes",
                       "Bytes of the blobs cached content uses (those it shares with hosted "
                       "content included), as of the last eviction pass",
                       multiprocess_mode="mostrecent")
    STORE_SIZE = Gauge("regproxy_store_size_bytes",
                       "Bytes of the blobs in the store by what uses them: cached (only "
                       "cached content, or nothing: what eviction may remove), shared "
                       "(cached and hosted content), hosted (only hosted content)",
                       ["kind"], multiprocess_mode="mostrecent")
    CACHE_BUDGET = Gauge("regproxy_cache_budget_bytes",
                         "Configured cache budget (0: unlimited); it limits the evictable bytes",
                         multiprocess_mode="mostrecent")
    DISK_FREE = Gauge("regproxy_disk_free_bytes",
                      "Bytes available to the server on the filesystem of storage.root",
                      multiprocess_mode="mostrecent")
    DISK_SIZE = Gauge("regproxy_disk_size_bytes", "Size of the filesystem of storage.root",
                      multiprocess_mode="mostrecent")
    EVICTIONS = Counter("regproxy_evictions_total", "Cached blobs and manifests evicted (LRU)")
    EVICTED_BYTES = Counter("regproxy_evicted_bytes_total", "Bytes freed by eviction")
    BUILD_INFO = Gauge("regproxy_build_info",
                       "Always 1: the labels say which regproxy and Python are running",
                       ["version", "python"], multiprocess_mode="max")


_define()
_OURS = {name: metric for name, metric in globals().items()
         if isinstance(metric, Counter | Gauge | Histogram)}


def share_between_processes(directory: Path) -> None:
    """Keep every sample in files of ``directory`` from now on (prometheus-client's
    multi-process mode), emptied first: processes forked afterwards add to the same figures.

    prometheus-client chooses the mode once, from ``PROMETHEUS_MULTIPROC_DIR`` when it is
    first imported, and metrics without labels get their value when they are made; this
    module is imported long before the configuration says how many workers there are. So
    the value class is switched here and the metrics are made again."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():  # samples of earlier runs must not be summed in
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()
    for metric in _OURS.values():
        REGISTRY.unregister(metric)
    _CHILDREN.clear()
    _TALLY.clear()
    _define()
    _OURS.update({name: globals()[name] for name in _OURS})


def shared_directory() -> Path | None:
    """The directory the processes' samples are in (see :func:`share_between_processes`)."""
    found = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(found) if found else None


def forget_process(pid: int) -> None:
    """A worker has exited: its in-flight gauges no longer count (its counters still do)."""
    directory = shared_directory()
    if directory is not None:
        multiprocess.mark_process_dead(pid, str(directory))


def announce_build() -> None:
    """Set ``regproxy_build_info`` (each worker, as it starts)."""
    child(BUILD_INFO, __version__, platform.python_version()).set(1)


def measure_disk(root: Path) -> None:
    """Set the disk gauges from ``statvfs`` of ``root`` (at each flush: one system call a
    second)."""
    try:
        st = os.statvfs(root)
    except OSError:  # the volume went away: the gauges keep their last value
        return
    DISK_FREE.set(st.f_bavail * st.f_frsize)
    DISK_SIZE.set(st.f_blocks * st.f_frsize)


def render() -> tuple[bytes, str]:
    """The exposition text of every metric (of every worker, when there are several)."""
    flush()
    if shared_directory() is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


_CHILDREN: BoundedDict[tuple[object, ...], Any] = BoundedDict(10_000)


def child(metric: Any, *labels: object) -> Any:
    """``metric.labels(*labels)``, memoised: the lookup costs more than the increment."""
    key = (metric, *labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*(str(x) for x in labels))
    return found


#: Per-request counts not yet added to their metrics (see :func:`count`).
_TALLY: dict[tuple[object, ...], float] = {}
#: Functions that fold tallies of their own into :func:`count` at each flush (the access
#: log keeps one entry per kind of request; see :func:`add_source`).
_SOURCES: list[Callable[[], None]] = []
#: Seconds between two flushes of the tally by :func:`flush_forever`.
FLUSH_INTERVAL = 1.0


def count(metric: Any, *labels: object, amount: float = 1) -> None:
    """Add ``amount`` to a counter's child, batched: an increment of a multiprocess
    counter takes a lock and writes its mmap file, a cost every request paid. The tally
    goes in at the next :func:`flush` (each second, and before ``/metrics`` renders)."""
    key = (metric, *labels)
    _TALLY[key] = _TALLY.get(key, 0) + amount


def add_source(fold: Callable[[], None]) -> None:
    """Have :func:`flush` call ``fold`` first, so that counts a module batches in its own
    form reach the metrics (and whatever else ``fold`` feeds) at the same moments."""
    if fold not in _SOURCES:
        _SOURCES.append(fold)


def remove_source(fold: Callable[[], None]) -> None:
    """Undo :func:`add_source` (an application stopping)."""
    if fold in _SOURCES:
        _SOURCES.remove(fold)


def flush() -> None:
    """Add the tally to the metrics."""
    for fold in _SOURCES:
        try:
            fold()
        except Exception:  # a broken source must not stop the rest or end the loop
            log.exception("folding %s failed", getattr(fold, "__qualname__", fold))
    while _TALLY:
        (metric, *labels), amount = _TALLY.popitem()
        try:
            child(metric, *labels).inc(amount)
        except Exception:  # one bad label set must not drop the rest or end the loop
            log.exception("dropping %s of %s%s", amount, metric, labels)


async def flush_forever() -> None:
    """Flush the tally every :data:`FLUSH_INTERVAL` (a background task of each worker)."""
    try:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            flush()
    finally:
        flush()
