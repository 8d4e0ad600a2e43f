"""Runs cache eviction in the background of the server.

One pass at a time across every process on the store (an ``flock``); passes run
periodically and soon after a fill when a size budget is set. Each pass drops what it
evicted from this process's in-memory caches and updates the cache metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from proxy import metrics
from proxy.pullthrough.coordination import Coordination
from proxy.reference import Digest
from proxy.storage import Store
from proxy.storage.eviction import EvictionReport, References, evict

log = logging.getLogger("regproxy.eviction")

#: A pass asked for by fills waits at least this many times the CPU time of the last pass
#: (and 1 s; at most the periodic interval): walking a big store then takes at most ~1/10
#: of one core, at the price of overshooting the budget by what arrives meanwhile (a 0.5 s
#: pass: what fills bring in 5 s).
PASS_SPACING = 10.0


class Evictor:
    """Keeps the cached content of ``store`` within ``max_size`` / ``max_age``.

    ``in_thread``: the store's objects are local files, walked in a thread; an object
    store is walked on this loop's connections. ``forget`` drops evicted objects from the
    in-memory caches of this process."""

    def __init__(self, store: Store, is_hosted: Callable[[str], bool],
                 coordination: Coordination, *, in_thread: bool,
                 forget: Callable[[list[Digest]], None], max_size: int, max_age: float,
                 interval: float = 60.0) -> None:
        self.store = store
        self.is_hosted = is_hosted
        self._coordination = coordination
        self._in_thread = in_thread
        self._forget = forget
        self.max_size = max_size
        self.max_age = max_age
        self.interval = interval
        self._wake = asyncio.Event()
        self.recent: list[tuple[float, str, int]] = []  #: (time, digest, bytes), newest last
        self.last_report: EvictionReport | None = None
        self.reported_at = 0.0  #: when ``last_report`` was made (epoch seconds)
        #: what each cached manifest references, kept between passes (see ``evict``)
        self._refs: References = {}
        self._pass_cpu = 0.0  #: CPU seconds of the last local pass (its thread's time)
        metrics.CACHE_BUDGET.set(max_size)

    def kick(self) -> None:
        """Ask for a pass soon (after a fill added bytes)."""
        if self.max_size > 0:
            self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("eviction pass failed")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the event being set, and the task would never stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
                    # woken by fills: coalesce a burst of them into one pass, and keep
                    # passes to a small share of a core however big the store grows
                    await asyncio.sleep(min(self.interval,
                                            max(1.0, self._pass_cpu * PASS_SPACING)))
            self._wake.clear()

    async def run_once(self) -> EvictionReport | None:
        """One pass, unless another process (or replica) is running one right now."""
        async with self._coordination.maintenance() as held:
            if not held:
                return None
            if self._in_thread:
                report = await asyncio.get_running_loop().run_in_executor(None, self._thread_pass)
            else:
                report = await self._pass()
        self.last_report, self.reported_at = report, time.time()
        self._forget([d for d, _ in report.evicted])
        metrics.CACHE_SIZE.set(report.cache_bytes)
        for kind, size in (("cached", report.remaining_bytes), ("shared", report.shared_bytes),
                           ("hosted", report.hosted_bytes)):
            metrics.child(metrics.STORE_SIZE, kind).set(size)
        if report.evicted:
            metrics.EVICTIONS.inc(len(report.evicted))
            metrics.EVICTED_BYTES.inc(report.evicted_bytes)
            now = time.time()
            self.recent.extend((now, str(d), size) for d, size in report.evicted)
            del self.recent[:-100]
            log.info("evicted %d objects, %d bytes; evictable cached content now %d bytes",
                     len(report.evicted), report.evicted_bytes, report.remaining_bytes)
        return report

    async def _pass(self) -> EvictionReport:
        # no limits set: still measured, for the metrics and the status page
        return await evict(self.store, max_size=self.max_size, max_age=self.max_age,
                           is_hosted=self.is_hosted, known_refs=self._refs)

    def _thread_pass(self) -> EvictionReport:
        started = time.thread_time()
        try:
            return asyncio.run(self._pass())
        finally:
            self._pass_cpu = time.thread_time() - started
