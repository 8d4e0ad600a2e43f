"""Per-upstream caps: concurrent requests, a request rate, and fill bandwidth.

Over a cap a request *waits* in a bounded FIFO queue rather than failing: a 429 makes
dockerd skip the mirror and go to the upstream itself (goharbor/harbor#22570). A full queue,
or a wait longer than ``max_wait``, raises :class:`UpstreamBusy`: a 503 ``UNAVAILABLE``
with ``Retry-After``, never a 429, which the client retries or takes to its next mirror.

* :class:`RequestLimiter`: at most ``max_concurrent`` requests in flight, and a token
  bucket of ``rate`` requests a second holding ``burst`` tokens; a caller waits until it
  has both. :meth:`RequestLimiter.observe_ratelimit` takes Docker Hub's
  ``ratelimit-remaining``/``ratelimit-limit`` headers: at or below ``slow_below`` of the
  limit the rate is halved until the window refills (no effect without a rate cap).
  :meth:`RequestLimiter.try_acquire` takes only slots free right now (never waiting, and
  none while anyone is queued): a ranged fill's extra parts, which must never wait for a
  slot while their fill holds one.
* :class:`ByteBucket`: ``bandwidth`` bytes a second, shared by an upstream's fills; a fill
  awaits :meth:`ByteBucket.take` for each chunk before passing it on.

Time comes from a :class:`Clock` (the running event loop by default), so tests drive it
by hand. Single flight stays outside: the limiter belongs around the one upstream request
a flight makes, so a burst of identical requests costs one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.errors import Unavailable
from proxy.settings.fields import ConfigError, parse_duration, parse_size, take_keys

#: What slow-down mode multiplies the rate by.
SLOW_FACTOR = 0.5
LIMIT_KEYS = frozenset({"max_concurrent", "rate", "burst", "queue", "max_wait", "bandwidth",
                        "slow_below"})


class Timer(Protocol):
    def cancel(self) -> Any: ...


class Clock(Protocol):
    """Monotonic seconds and a timer: the part of an event loop the limiter needs."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running event loop's clock (``loop.time()`` is monotonic)."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


class UpstreamBusy(Unavailable):
    """An upstream's caps are full and the request could not wait longer: 503 with
    ``Retry-After``. It is this proxy's choice, not the upstream's failure, so it must
    never count against the upstream's circuit breaker."""


@dataclass(frozen=True, slots=True)
class Caps:
    """``[upstreams.<name>.limits]``; a zero turns that cap off."""

    max_concurrent: int = 0  #: requests in flight to the upstream
    rate: float = 0.0  #: requests a second (a token bucket)
    burst: int = 0  #: tokens the bucket holds; 0: one second's worth (at least 1)
    queue: int = 256  #: callers that may wait for a slot; 0: over a cap answers 503 at once
    max_wait: float = 10.0  #: seconds a caller may wait before it gets a 503
    bandwidth: int = 0  #: bytes a second, shared by the upstream's fills
    #: Docker Hub's ``ratelimit-remaining`` at or below this share of ``ratelimit-limit``
    #: halves the rate.
    slow_below: float = 0.1

    @property
    def bucket_size(self) -> float:
        return float(self.burst) if self.burst else max(1.0, math.ceil(self.rate))


@dataclass(slots=True)
class LimiterStats:
    """Counters for metrics: waits, their length, and refusals."""

    granted: int = 0  #: slots handed out, at once or after a wait
    waited: int = 0  #: of those, how many had to wait
    wait_seconds: float = 0.0  #: total time granted callers waited
    max_wait_seconds: float = 0.0
    rejected_full: int = 0  #: 503s because the queue was full
    rejected_timeout: int = 0  #: 503s because ``max_wait`` passed


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    since: float
    timer: Timer | None = field(default=None)
    background: bool = False


#: Set in work no client waits for (layer prefetch): such requests queue behind every
#: client's, so that clients' requests go first (tasks started inside inherit it).
BACKGROUND: ContextVar[bool] = ContextVar("regproxy_background", default=False)


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Mark the upstream requests made inside (and in tasks started inside) as background."""
    token = BACKGROUND.set(True)
    try:
        yield
    finally:
        BACKGROUND.reset(token)


def _header_number(value: str | None) -> int | None:
    """``76;w=21600`` (Docker Hub's form) or ``76`` -> 76; ``None`` when absent or odd."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,12})\s*(?:;.*)?", value)
    return int(m.group(1)) if m else None


class RequestLimiter:
    """Concurrency and rate caps for one upstream, with a bounded FIFO wait queue."""

    def __init__(self, name: str, caps: Caps, clock: Clock | None = None,
                 on_wait: Callable[[float], None] | None = None) -> None:
        self.name = name
        self.caps = caps
        self.stats = LimiterStats()
        self._clock: Clock = clock or LoopClock()
        self._on_wait = on_wait  #: called with each granted wait, for a histogram
        self._queue: deque[_Waiter] = deque()
        self._in_flight = 0
        self._tokens = caps.bucket_size
        self._refilled: float | None = None  # set on first use: the loop may not run yet
        self._wake: Timer | None = None
        self._slowed = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting now (the queue-length gauge)."""
        return len(self._queue)

    @property
    def slowed(self) -> bool:
        return self._slowed

    @property
    def rate(self) -> float:
        """The request rate in force (halved in slow-down mode); 0: no rate cap."""
        return self.caps.rate * (SLOW_FACTOR if self._slowed else 1.0)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of an upstream request."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Take a slot, waiting in line when a cap is reached; :class:`UpstreamBusy` when
        the line is full or the wait exceeds ``max_wait``. In :func:`background` work the
        request waits behind every client's, and a client finding the line full takes the
        place of the last background waiter (which is told busy)."""
        behind = BACKGROUND.get()
        if not self._queue and self._take():
            self.stats.granted += 1
            return
        if len(self._queue) >= self.caps.queue and (behind or not self._bump_background()):
            self.stats.rejected_full += 1
            raise self._busy(f"{len(self._queue)} requests already waiting")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), self._clock.time(),
                         background=behind)
        waiter.timer = self._clock.call_later(self.caps.max_wait, lambda: self._expire(waiter))
        if behind:
            self._queue.append(waiter)
        else:  # ahead of the background waiters, behind the other clients
            at = next((i for i, w in enumerate(self._queue) if w.background), len(self._queue))
            self._queue.insert(at, waiter)
        self._schedule()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() \
                    and waiter.future.exception() is None:
                self.release()  # granted just as the caller went away: pass the slot on
            else:
                self._forget(waiter)
            raise

    def try_acquire(self, n: int) -> int:
        """Take up to ``n`` slots that are free right now, never waiting: how many were
        taken (0 when anyone waits in line: queued callers go first). Both caps count, so
        under a rate cap this takes at most the tokens in the bucket. For a fill's extra
        ranged parts: a caller holding a slot must never wait for another (two such fills
        could each hold one and wait for the other's). Each taken slot is given back with
        :meth:`release`."""
        if n <= 0 or any(not w.future.done() for w in self._queue):
            return 0
        taken = 0
        while taken < n and self._take():
            taken += 1
        self.stats.granted += taken
        return taken

    def release(self) -> None:
        """Give a slot back (after the request's response is read or abandoned)."""
        if self._in_flight <= 0:
            raise RuntimeError(f"upstream {self.name}: a slot released twice")
        self._in_flight -= 1
        self._pump()

    def slow_down(self, on: bool) -> None:
        """Enter or leave slow-down mode (half the rate)."""
        if on == self._slowed:
            return
        self._refill()  # tokens earned so far count at the old rate
        self._slowed = on
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self._pump()

    def observe_ratelimit(self, remaining: str | None, limit: str | None) -> None:
        """Feed an upstream answer's ``ratelimit-remaining`` and ``ratelimit-limit``:
        slow down when the remaining budget is at or below ``slow_below`` of the limit
        (or zero, when the limit is not known); absent or malformed headers change nothing."""
        left = _header_number(remaining)
        if left is None:
            return
        total = _header_number(limit)
        threshold = self.caps.slow_below * total if total else 0.0
        self.slow_down(left <= threshold)

    # --- internals ------------------------------------------------------------------------

    def _busy(self, why: str) -> UpstreamBusy:
        caps = [f"max_concurrent {self.caps.max_concurrent}" if self.caps.max_concurrent else "",
                f"rate {self.rate:g}/s" if self.caps.rate else ""]
        retry = max(1, math.ceil(self.caps.max_wait))
        return UpstreamBusy(f"upstream {self.name} is at its cap ({', '.join(c for c in caps if c)}): "
                            f"{why}", headers={"Retry-After": str(retry)})

    def _refill(self) -> None:
        now = self._clock.time()
        if self._refilled is not None and self.caps.rate:
            self._tokens = min(self.caps.bucket_size, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    def _take(self) -> bool:
        """A slot now, if both caps allow one."""
        if self.caps.max_concurrent and self._in_flight >= self.caps.max_concurrent:
            return False
        if self.caps.rate:
            self._refill()
            if self._tokens < 1 - 1e-9:  # a timer due "at" the next token may land a hair early
                return False
            self._tokens -= 1
        self._in_flight += 1
        return True

    def _pump(self) -> None:
        """Hand slots to the head of the line while the caps allow, then make sure a timer
        will come back when only the rate holds the line up."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # timed out or cancelled, not yet removed
                self._queue.popleft()
                continue
            if not self._take():
                break
            self._queue.popleft()
            if head.timer is not None:
                head.timer.cancel()
            waited = self._clock.time() - head.since
            self.stats.granted += 1
            self.stats.waited += 1
            self.stats.wait_seconds += waited
            self.stats.max_wait_seconds = max(self.stats.max_wait_seconds, waited)
            if self._on_wait is not None:
                self._on_wait(waited)
            head.future.set_result(None)
        self._schedule()

    def _schedule(self) -> None:
        """A wake-up for when the next token is due, if the line waits for tokens only."""
        if self._wake is not None or not self._queue or not self.caps.rate:
            return
        if self.caps.max_concurrent and self._in_flight >= self.caps.max_concurrent:
            return  # a release will pump
        self._refill()
        delay = max(0.0, (1 - self._tokens) / self.rate)
        self._wake = self._clock.call_later(delay, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._pump()

    def _bump_background(self) -> bool:
        """Refuse the last background waiter to make room for a client: whether one was."""
        last = next((w for w in reversed(self._queue) if w.background and not w.future.done()),
                    None)
        if last is None:
            return False
        if last.timer is not None:
            last.timer.cancel()
        self._queue.remove(last)
        self.stats.rejected_full += 1
        last.future.set_exception(self._busy("a client request took its place in the line"))
        return True

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._forget(waiter)
        self.stats.rejected_timeout += 1
        waiter.future.set_exception(self._busy(f"no slot within {self.caps.max_wait:g} s"))

    def _forget(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(waiter)
        self._pump()  # the head may have changed


class ByteBucket:
    """A bandwidth cap: ``rate`` bytes a second shared by every caller, holding up to
    ``burst`` bytes (one second's worth by default). Each :meth:`take` reserves its bytes
    at once and waits off any debt, so concurrent fills share the rate in arrival order."""

    def __init__(self, rate: int, clock: Clock | None = None, burst: int = 0) -> None:
        if rate <= 0:
            raise ValueError("a bandwidth cap needs a positive rate")
        self.rate = rate
        self.burst = burst or rate
        self.bytes = 0  #: bytes passed through
        self.wait_seconds = 0.0  #: total time callers waited
        self._clock: Clock = clock or LoopClock()
        self._tokens = float(self.burst)
        self._refilled: float | None = None

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes fit the rate."""
        now = self._clock.time()
        if self._refilled is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        self._tokens -= n
        self.bytes += n
        if self._tokens >= 0:
            return
        delay = -self._tokens / self.rate
        self.wait_seconds += delay
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def due() -> None:
            if not future.done():
                future.set_result(None)

        timer = self._clock.call_later(delay, due)
        try:
            await future
        finally:
            timer.cancel()


# --- configuration ----------------------------------------------------------------------------

_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DEFAULTS = Caps()


def parse_rate(key: str, value: Any) -> float:
    """``10`` (a second), ``"10/s"``, ``"600/m"``, ``"100/h"`` -> requests a second."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*", value)
        if m:
            return float(m.group(1)) / _RATE_UNITS[m.group(2)]
    raise ConfigError(key, f"expected requests a second such as 10, or \"600/m\", got {value!r}")


def _count(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(key, f"expected a whole number (0: no cap), got {value!r}")
    return value


def parse_limits(key: str, raw: Any) -> Caps:
    """``[upstreams.<name>.limits]``; ``key`` is that table's key. Errors name the key."""
    if raw is None:
        return Caps()
    t = take_keys(raw, key, set(LIMIT_KEYS))
    bandwidth = t.get("bandwidth", 0)
    if isinstance(bandwidth, str):
        bandwidth = bandwidth.strip().removesuffix("/s")
    max_wait = parse_duration(f"{key}.max_wait", t.get("max_wait", _DEFAULTS.max_wait))
    if max_wait <= 0:
        raise ConfigError(f"{key}.max_wait", "must be more than 0 s (queue = 0 refuses at once instead)")
    slow_below = t.get("slow_below", _DEFAULTS.slow_below)
    if not isinstance(slow_below, int | float) or isinstance(slow_below, bool) or not 0 <= slow_below <= 1:
        raise ConfigError(f"{key}.slow_below",
                          f"expected a share from 0 to 1 such as 0.1, got {slow_below!r}")
    return Caps(
        max_concurrent=_count(f"{key}.max_concurrent", t.get("max_concurrent", 0)),
        rate=parse_rate(f"{key}.rate", t.get("rate", 0)),
        burst=_count(f"{key}.burst", t.get("burst", 0)),
        queue=_count(f"{key}.queue", t.get("queue", _DEFAULTS.queue)),
        max_wait=max_wait,
        bandwidth=parse_size(f"{key}.bandwidth", bandwidth),
        slow_below=float(slow_below),
    )
