"""Per-upstream caps (proxy/policy/limits.py), driven by a fake clock: no timed waits, no
timing assertions. Time moves only when a test calls ``clock.advance``."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

import pytest

from proxy.config import ConfigError
from proxy.errors import Unavailable
from proxy.policy.limits import (
    ByteBucket,
    Caps,
    RequestLimiter,
    UpstreamBusy,
    background,
    parse_limits,
    parse_rate,
)


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Monotonic time that moves only on :meth:`advance`, firing due timers in order."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._timers, (self.now + delay, next(self._seq), timer, callback))
        return timer

    def pending(self) -> int:
        return sum(not t.cancelled for _, _, t, _ in self._timers)

    async def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._timers and self._timers[0][0] <= end + 1e-12:
            when, _, timer, callback = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not timer.cancelled:
                callback()
            await settle()
        self.now = end
        await settle()


async def settle() -> None:
    """Let every task that can run, run (a few loop turns; no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def start(limiter: RequestLimiter, n: int) -> list[asyncio.Task[None]]:
    return [asyncio.ensure_future(limiter.acquire()) for _ in range(n)]


def states(tasks: list[asyncio.Task[None]]) -> list[str]:
    out = []
    for t in tasks:
        if not t.done():
            out.append("waiting")
        elif t.cancelled():
            out.append("cancelled")
        elif t.exception() is not None:
            out.append("busy")
        else:
            out.append("granted")
    return out


# --- concurrency ---------------------------------------------------------------------------

async def test_no_caps_never_wait():
    limiter = RequestLimiter("u", Caps(), FakeClock())
    tasks = start(limiter, 50)
    await settle()
    assert states(tasks) == ["granted"] * 50
    assert limiter.in_flight == 50 and limiter.queued == 0
    assert limiter.stats.granted == 50 and limiter.stats.waited == 0


async def test_concurrency_cap_queues_in_order():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(max_concurrent=2), clock)
    tasks = start(limiter, 5)
    await settle()
    assert states(tasks) == ["granted", "granted", "waiting", "waiting", "waiting"]
    assert limiter.queued == 3 and limiter.in_flight == 2
    await clock.advance(1.5)
    limiter.release()
    await settle()
    assert states(tasks) == ["granted", "granted", "granted", "waiting", "waiting"]  # FIFO
    limiter.release()
    limiter.release()
    await settle()
    assert states(tasks) == ["granted"] * 5
    assert limiter.queued == 0 and limiter.in_flight == 2
    assert limiter.stats.waited == 3
    assert limiter.stats.wait_seconds == pytest.approx(4.5)
    assert limiter.stats.max_wait_seconds == pytest.approx(1.5)
    assert clock.pending() == 0  # every wait's timeout was cancelled


async def test_slot_context_releases_on_error():
    limiter = RequestLimiter("u", Caps(max_concurrent=1), FakeClock())
    with pytest.raises(RuntimeError, match="boom"):
        async with limiter.slot():
            assert limiter.in_flight == 1
            raise RuntimeError("boom")
    assert limiter.in_flight == 0
    async with limiter.slot():
        assert limiter.in_flight == 1


async def test_double_release_is_a_bug():
    limiter = RequestLimiter("u", Caps(max_concurrent=1), FakeClock())
    await limiter.acquire()
    limiter.release()
    with pytest.raises(RuntimeError, match="released twice"):
        limiter.release()


# --- the bounded queue and the wait timeout: 503, never 429 -----------------------------------

async def test_full_queue_answers_503_with_retry_after():
    limiter = RequestLimiter("docker.io", Caps(max_concurrent=1, queue=2, max_wait=7.5), FakeClock())
    tasks = start(limiter, 3)
    await settle()
    assert states(tasks) == ["granted", "waiting", "waiting"]
    with pytest.raises(UpstreamBusy) as info:
        await limiter.acquire()
    err = info.value
    assert isinstance(err, Unavailable)
    assert (err.status, err.code) == (503, "UNAVAILABLE")
    assert err.headers == {"Retry-After": "8"}
    assert err.message == "upstream docker.io is at its cap (max_concurrent 1): 2 requests already waiting"
    assert limiter.stats.rejected_full == 1 and limiter.queued == 2


async def test_queue_zero_refuses_at_once():
    limiter = RequestLimiter("u", Caps(max_concurrent=1, queue=0), FakeClock())
    await limiter.acquire()
    with pytest.raises(UpstreamBusy):
        await limiter.acquire()


async def test_wait_timeout_answers_503_and_leaves_the_line():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(max_concurrent=1, max_wait=2), clock)
    tasks = start(limiter, 3)
    await settle()
    await clock.advance(1.9)
    assert states(tasks) == ["granted", "waiting", "waiting"]
    await clock.advance(0.1)
    assert states(tasks) == ["granted", "busy", "busy"]
    err = tasks[1].exception()
    assert isinstance(err, UpstreamBusy) and err.status == 503
    assert "no slot within 2 s" in err.message
    assert limiter.queued == 0 and limiter.stats.rejected_timeout == 2
    limiter.release()  # the slot is free again, for the next caller, not for the timed-out ones
    assert limiter.in_flight == 0
    late = start(limiter, 1)
    await settle()
    assert states(late) == ["granted"]


async def test_cancelled_waiter_leaves_the_line_without_a_slot():
    limiter = RequestLimiter("u", Caps(max_concurrent=1), FakeClock())
    tasks = start(limiter, 3)
    await settle()
    tasks[1].cancel()
    await settle()
    assert states(tasks) == ["granted", "cancelled", "waiting"]
    assert limiter.queued == 1
    limiter.release()
    await settle()
    assert states(tasks) == ["granted", "cancelled", "granted"]
    assert limiter.in_flight == 1


async def test_cancel_racing_a_grant_passes_the_slot_on():
    """Granted and cancelled in the same loop turn: the slot must not leak."""
    limiter = RequestLimiter("u", Caps(max_concurrent=1), FakeClock())
    tasks = start(limiter, 3)
    await settle()
    limiter.release()   # grants tasks[1] (its future is done, the task not yet resumed)...
    tasks[1].cancel()   # ...and its client goes away before it runs
    await settle()
    assert states(tasks) == ["granted", "cancelled", "granted"]
    assert limiter.in_flight == 1 and limiter.queued == 0


# --- the rate (token bucket) -------------------------------------------------------------------

async def test_rate_cap_spaces_requests():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(rate=2, burst=2), clock)
    tasks = start(limiter, 5)
    await settle()
    assert states(tasks) == ["granted", "granted", "waiting", "waiting", "waiting"]  # the burst
    await clock.advance(0.49)
    assert states(tasks)[2] == "waiting"
    await clock.advance(0.01)
    assert states(tasks) == ["granted", "granted", "granted", "waiting", "waiting"]
    await clock.advance(1.0)
    assert states(tasks) == ["granted"] * 5
    assert limiter.stats.wait_seconds == pytest.approx(0.5 + 1.0 + 1.5)
    assert limiter.in_flight == 5  # the rate limits starts, not requests in flight


async def test_a_newcomer_does_not_overtake_the_line():
    """A token that is due but whose timer has not run yet goes to the head of the line."""
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(rate=1, burst=1), clock)
    tasks = start(limiter, 2)
    await settle()
    clock.now += 1.0  # time passes, the loop has not run the wake-up timer yet
    newcomer = start(limiter, 1)
    await settle()
    assert states(tasks + newcomer) == ["granted", "waiting", "waiting"]
    await clock.advance(0)
    assert states(tasks + newcomer) == ["granted", "granted", "waiting"]


async def test_bucket_refills_up_to_its_size_only():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(rate=1, burst=3), clock)
    start(limiter, 3)
    await settle()
    await clock.advance(100)  # idle: the bucket holds 3, not 100
    tasks = start(limiter, 4)
    await settle()
    assert states(tasks) == ["granted", "granted", "granted", "waiting"]


async def test_default_burst_is_one_seconds_worth():
    assert Caps(rate=0.2).bucket_size == 1
    assert Caps(rate=10).bucket_size == 10
    assert Caps(rate=2.5).bucket_size == 3
    assert Caps(rate=10, burst=4).bucket_size == 4


async def test_rate_and_concurrency_together():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(max_concurrent=1, rate=1, burst=1), clock)
    tasks = start(limiter, 2)
    await settle()
    await clock.advance(5)  # a token is there, but the slot is not
    assert states(tasks) == ["granted", "waiting"]
    limiter.release()
    await settle()
    assert states(tasks) == ["granted", "granted"]
    limiter.release()
    more = start(limiter, 1)
    await settle()
    assert states(more) == ["waiting"]  # the slot is free, the token was spent a moment ago
    await clock.advance(1)
    assert states(more) == ["granted"]


async def test_rate_wait_times_out_too():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(rate=0.1, burst=1, max_wait=3), clock)
    tasks = start(limiter, 2)
    await settle()
    await clock.advance(3)
    assert states(tasks) == ["granted", "busy"]
    assert "rate 0.1/s" in tasks[1].exception().message


# --- slow-down mode --------------------------------------------------------------------------------

async def test_slow_down_halves_the_rate():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(rate=2, burst=1), clock)
    limiter.slow_down(True)
    assert limiter.slowed and limiter.rate == 1
    tasks = start(limiter, 2)
    await settle()
    await clock.advance(0.5)  # at the full rate this would be enough
    assert states(tasks) == ["granted", "waiting"]
    await clock.advance(0.5)
    assert states(tasks) == ["granted", "granted"]


async def test_leaving_slow_down_brings_the_wait_forward():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(rate=1, burst=1), clock)
    limiter.slow_down(True)
    tasks = start(limiter, 2)
    await settle()
    await clock.advance(1.0)  # half a token at the slowed rate
    assert states(tasks) == ["granted", "waiting"]
    limiter.slow_down(False)
    await clock.advance(0.5)  # the other half at the full rate
    assert states(tasks) == ["granted", "granted"]
    assert limiter.stats.wait_seconds == pytest.approx(1.5)


@pytest.mark.parametrize(("remaining", "limit", "slowed"), [
    ("76;w=21600", "100;w=21600", False),
    ("10;w=21600", "100;w=21600", True),   # at slow_below (0.1) of the limit
    ("11;w=21600", "100;w=21600", False),
    ("0", None, True),                      # no limit known: only an empty budget slows down
    ("3", None, False),
    ("3", "garbage", False),
])
async def test_ratelimit_headers_feed_slow_down(remaining, limit, slowed):
    limiter = RequestLimiter("docker.io", Caps(rate=10), FakeClock())
    limiter.observe_ratelimit(remaining, limit)
    assert limiter.slowed is slowed
    assert limiter.rate == (5 if slowed else 10)


async def test_ratelimit_window_refill_leaves_slow_down():
    limiter = RequestLimiter("docker.io", Caps(rate=10), FakeClock())
    limiter.observe_ratelimit("2;w=21600", "100;w=21600")
    assert limiter.slowed
    for odd in (None, "", "many", "-1", "1" * 20):
        limiter.observe_ratelimit(odd, "100")  # absent or malformed: no change
        assert limiter.slowed
    limiter.observe_ratelimit("100;w=21600", "100;w=21600")
    assert not limiter.slowed


async def test_wait_observer_sees_each_wait():
    clock = FakeClock()
    seen: list[float] = []
    limiter = RequestLimiter("u", Caps(max_concurrent=1), clock, on_wait=seen.append)
    start(limiter, 2)
    await settle()
    await clock.advance(0.25)
    limiter.release()
    await settle()
    assert seen == [pytest.approx(0.25)]


# --- bandwidth ---------------------------------------------------------------------------------------

async def test_byte_bucket_paces_chunks():
    clock = FakeClock()
    bucket = ByteBucket(1000, clock)
    first = asyncio.ensure_future(bucket.take(1000))  # the burst: one second's worth
    await settle()
    assert first.done()
    second = asyncio.ensure_future(bucket.take(500))
    await settle()
    await clock.advance(0.49)
    assert not second.done()
    await clock.advance(0.01)
    assert second.done()
    assert bucket.bytes == 1500 and bucket.wait_seconds == pytest.approx(0.5)


async def test_byte_bucket_shares_the_rate_in_arrival_order():
    clock = FakeClock()
    bucket = ByteBucket(1000, clock, burst=1)
    await bucket.take(1)
    a = asyncio.ensure_future(bucket.take(1000))
    b = asyncio.ensure_future(bucket.take(1000))
    await settle()
    await clock.advance(1.0)
    assert (a.done(), b.done()) == (True, False)
    await clock.advance(1.0)
    assert b.done()


async def test_byte_bucket_chunk_larger_than_the_burst():
    clock = FakeClock()
    bucket = ByteBucket(100, clock)
    big = asyncio.ensure_future(bucket.take(1000))
    await settle()
    await clock.advance(8.99)
    assert not big.done()
    await clock.advance(0.01)
    assert big.done()


async def test_byte_bucket_cancel_cancels_its_timer():
    clock = FakeClock()
    bucket = ByteBucket(100, clock, burst=1)
    waiting = asyncio.ensure_future(bucket.take(500))
    await settle()
    assert clock.pending() == 1
    waiting.cancel()
    await settle()
    assert waiting.cancelled() and clock.pending() == 0


def test_byte_bucket_needs_a_rate():
    with pytest.raises(ValueError):
        ByteBucket(0)


async def test_real_loop_clock_is_the_default():
    """Without a clock the running loop's is used (a cap that never waits, so no time passes)."""
    limiter = RequestLimiter("u", Caps(max_concurrent=1, rate=1000))
    async with limiter.slot():
        assert limiter.in_flight == 1
    await ByteBucket(1 << 20).take(1024)


# --- configuration -----------------------------------------------------------------------------------

def test_parse_limits_values():
    caps = parse_limits("upstreams.docker.io.limits", {
        "max_concurrent": 8, "rate": "600/m", "burst": 20, "queue": 100, "max_wait": "30s",
        "bandwidth": "50MiB/s", "slow_below": 0.2})
    assert caps == Caps(max_concurrent=8, rate=10.0, burst=20, queue=100, max_wait=30.0,
                        bandwidth=50 << 20, slow_below=0.2)
    assert parse_limits("k", None) == Caps()
    assert parse_limits("k", {}) == Caps()
    assert parse_limits("k", {"bandwidth": "1MiB"}).bandwidth == 1 << 20


@pytest.mark.parametrize(("value", "expected"), [
    (10, 10.0), (0.5, 0.5), ("10/s", 10.0), ("600/m", 10.0), ("100/h", 100 / 3600), (" 3 / s ", 3.0)])
def test_parse_rate(value, expected):
    assert parse_rate("k", value) == pytest.approx(expected)


@pytest.mark.parametrize(("raw", "key", "problem"), [
    ("fast", "upstreams.u.limits", "expected a table"),
    ({"max_concurency": 1}, "upstreams.u.limits.max_concurency", "unknown key"),
    ({"max_concurrent": -1}, "upstreams.u.limits.max_concurrent", "whole number"),
    ({"max_concurrent": 1.5}, "upstreams.u.limits.max_concurrent", "whole number"),
    ({"max_concurrent": True}, "upstreams.u.limits.max_concurrent", "whole number"),
    ({"rate": "10/d"}, "upstreams.u.limits.rate", "requests a second"),
    ({"rate": -1}, "upstreams.u.limits.rate", "requests a second"),
    ({"queue": "lots"}, "upstreams.u.limits.queue", "whole number"),
    ({"max_wait": 0}, "upstreams.u.limits.max_wait", "more than 0 s"),
    ({"max_wait": "soon"}, "upstreams.u.limits.max_wait", "duration"),
    ({"bandwidth": "fast"}, "upstreams.u.limits.bandwidth", "size"),
    ({"slow_below": 2}, "upstreams.u.limits.slow_below", "share from 0 to 1"),
    ({"slow_below": "10%"}, "upstreams.u.limits.slow_below", "share from 0 to 1"),
])
def test_parse_limits_errors_name_the_key(raw, key, problem):
    with pytest.raises(ConfigError) as info:
        parse_limits("upstreams.u.limits", raw)
    assert info.value.key == key and problem in info.value.problem
    assert "\n" not in str(info.value)


def start_background(limiter: RequestLimiter, n: int) -> list[asyncio.Task[None]]:
    """``n`` acquisitions made in :func:`background` work (the tasks inherit the mark)."""
    with background():
        return start(limiter, n)


async def test_clients_go_ahead_of_background_requests():
    """Prefetch (background) requests wait behind every client's; clients keep their order."""
    limiter = RequestLimiter("u", Caps(max_concurrent=1), FakeClock())
    first = start(limiter, 1)
    behind = start_background(limiter, 2)
    await settle()
    clients = start(limiter, 2)
    await settle()
    assert states(first + behind + clients) == ["granted", "waiting", "waiting", "waiting", "waiting"]
    order = []
    for _ in range(4):
        limiter.release()
        await settle()
        order.append(states(behind + clients))
    assert order == [
        ["waiting", "waiting", "granted", "waiting"],
        ["waiting", "waiting", "granted", "granted"],
        ["granted", "waiting", "granted", "granted"],
        ["granted", "granted", "granted", "granted"],
    ]


async def test_a_client_takes_the_place_of_a_background_waiter_in_a_full_line():
    limiter = RequestLimiter("u", Caps(max_concurrent=1, queue=2), FakeClock())
    first = start(limiter, 1)
    behind = start_background(limiter, 2)
    await settle()
    client = start(limiter, 1)
    await settle()
    assert states(first + behind + client) == ["granted", "waiting", "busy", "waiting"]
    assert isinstance(behind[1].exception(), UpstreamBusy)
    more_background = start_background(limiter, 1)  # the line is full: no client to bump
    await settle()
    assert states(more_background) == ["busy"]
    limiter.release()
    await settle()
    assert states(behind[:1] + client) == ["waiting", "granted"]


# --- taking free slots without waiting -------------------------------------------------------

async def test_try_acquire_takes_only_the_free_slots_and_never_waits():
    limiter = RequestLimiter("u", Caps(max_concurrent=4), FakeClock())
    await limiter.acquire()
    assert limiter.try_acquire(3) == 3 and limiter.in_flight == 4
    assert limiter.try_acquire(2) == 0 and limiter.queued == 0  # full: none, and no wait
    for _ in range(4):
        limiter.release()
    assert limiter.try_acquire(0) == 0 and limiter.try_acquire(-1) == 0
    assert limiter.try_acquire(9) == 4 and limiter.in_flight == 4
    assert limiter.stats.granted == 8 and limiter.stats.waited == 0
    with pytest.raises(RuntimeError):
        for _ in range(5):
            limiter.release()  # each taken slot goes back once; a fifth is a bug
    assert limiter.in_flight == 0


async def test_try_acquire_without_caps_takes_all():
    limiter = RequestLimiter("u", Caps(), FakeClock())
    assert limiter.try_acquire(3) == 3 and limiter.in_flight == 3


async def test_a_caller_in_line_goes_before_try_acquire():
    """A slot freed while someone waits is theirs; and tokens earned while the waiter's
    wake-up has not run yet are not taken from under it either."""
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(max_concurrent=2), clock)
    await limiter.acquire()
    await limiter.acquire()
    [waiter] = start(limiter, 1)
    await settle()
    limiter.release()  # handed to the waiter at once
    await settle()
    assert states([waiter]) == ["granted"] and limiter.try_acquire(1) == 0
    limiter.release()
    limiter.release()

    limiter = RequestLimiter("u", Caps(max_concurrent=4, rate=1, burst=1), clock)
    await limiter.acquire()  # the only token
    [waiter] = start(limiter, 1)
    await settle()
    assert limiter.queued == 1
    clock.now += 3  # tokens earned, the wake-up timer not fired yet
    assert limiter.try_acquire(3) == 0 and limiter.in_flight == 1
    await clock.advance(0)  # the wake-up: the waiter gets its token
    assert states([waiter]) == ["granted"] and limiter.in_flight == 2


async def test_try_acquire_takes_at_most_the_tokens_in_the_bucket():
    clock = FakeClock()
    limiter = RequestLimiter("u", Caps(rate=2, burst=3), clock)
    assert limiter.try_acquire(5) == 3
    assert limiter.try_acquire(1) == 0
    await clock.advance(0.5)
    assert limiter.try_acquire(5) == 1
