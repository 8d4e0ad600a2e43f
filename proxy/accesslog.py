"""Per-request bookkeeping: one logfmt access-log line and the request metrics.

Both run in aiohttp's access-log hook, which is cheaper than a middleware. A request only
bumps one tally entry (its latency as a count in its histogram bucket); the metrics and
the status page's statistics get the tally at the metrics' next flush (each second, and
before ``/metrics`` or the status page renders): five counter updates per request cost
~7 % of a cached manifest GET.
"""

from __future__ import annotations

import bisect
import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, ResponseKey, StreamResponse

from proxy import metrics
from proxy.handlers.common import CACHE_OUTCOME, HOSTED_READ, REPO
from proxy.stats import CACHE_OUTCOMES, STATS

#: Set on a response whose request gets no access-log line (it is counted in the metrics):
#: requests aiohttp could not parse, which are reported rate-limited instead.
UNLOGGED = ResponseKey("unlogged", bool)

#: Handlers whose requests are cache reads, and the kind they count as.
_CACHE_KINDS = {"get_manifest": "manifest", "get_blob": "blob"}
#: Cache outcomes whose bytes needed no upstream transfer of their own ("saved").
_SAVED = frozenset((*CACHE_OUTCOMES, "stale", "coalesced"))
#: Where the fields of a pending entry are: requests, body bytes sent, seconds, then one
#: count per latency bucket.
_REQUESTS, _SENT, _SECONDS, _BUCKETS = 0, 1, 2, 3
_ENTRY_SIZE = _BUCKETS + len(metrics.LATENCY_BUCKETS) + 1
_LATENCY_BOUNDS = metrics.LATENCY_BUCKETS
_bucket = bisect.bisect_left  # the index of a latency's bucket (as metrics.latency_bucket)


#: Requests not yet counted, by (handler, method, status, cache outcome, repository):
#: see the fields above. The repository is kept for cache and hosted reads only.
_PENDING: dict[tuple[str, str, int, str, str | None], list[float]] = {}


def fold() -> None:
    """Move the pending request counts into the metrics and the status statistics."""
    while _PENDING:
        (handler, method, status, outcome, repo), entry = _PENDING.popitem()
        requests, sent = int(entry[_REQUESTS]), int(entry[_SENT])
        metrics.count(metrics.REQUESTS, handler, method, status, amount=requests)
        buckets = [int(n) for n in entry[_BUCKETS:]]
        metrics.child(metrics.REQUEST_LATENCY, handler, outcome).add(buckets, entry[_SECONDS])
        kind = _CACHE_KINDS.get(handler)
        if kind is None or outcome == "-":
            continue
        body = method == "GET" and status in (200, 206)
        if outcome == HOSTED_READ:  # served from the store, but no cache read
            STATS.record(repo, None, sent, requests=requests)
            if kind == "blob" and body:
                metrics.count(metrics.BYTES_SERVED, "hosted", amount=sent)
            continue
        metrics.count(metrics.CACHE, kind, outcome, amount=requests)
        STATS.record(repo, outcome, sent, requests=requests)
        if body and outcome in _SAVED:
            metrics.count(metrics.BYTES_SAVED, kind, amount=sent)
        if kind == "blob" and body:
            source = "cache" if outcome == "hit" else "upstream"
            metrics.count(metrics.BYTES_SERVED, source, amount=sent)


metrics.add_source(fold)


def _bytes_sent(request: BaseRequest, response: StreamResponse) -> int:
    """Body bytes sent. aiohttp's count includes the header block, so a body of known
    length counts as at most that (``sendfile`` spans are added to the count as sent)."""
    if request.method == "HEAD":
        return 0
    length = response.content_length
    return response.body_length if length is None else min(length, response.body_length)


class AccessLogger(AbstractAccessLogger):
    """``method= path= status= bytes= duration_ms= cache= remote= ua=`` per request, logged
    when the ``regproxy.access`` logger is enabled for INFO; metrics are always recorded."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        try:
            handler: str = request.match_info.route.handler.__name__  # type: ignore[attr-defined]
        except (AttributeError, AssertionError):  # failed before routing (bad request line)
            handler = "none"
        outcome = request.get(CACHE_OUTCOME, "-")
        cache_read = outcome != "-" and handler in _CACHE_KINDS
        sent = _bytes_sent(request, response) if cache_read else 0
        key = (handler, request.method, response.status, outcome,
               request.get(REPO) if cache_read else None)
        pending = _PENDING.get(key)
        if pending is None:
            pending = _PENDING[key] = [0.0] * _ENTRY_SIZE
        # (literal indices, see _REQUESTS...: this runs for every request)
        pending[0] += 1
        pending[1] += sent
        pending[2] += time
        pending[3 + _bucket(_LATENCY_BOUNDS, time)] += 1
        if self.logger.isEnabledFor(logging.INFO) and not response.get(UNLOGGED, False):
            ua = request.headers.get("User-Agent", "-").replace('"', "'")[:120]
            self.logger.info(
                'method=%s path="%s" status=%d bytes=%d duration_ms=%.1f cache=%s remote=%s ua="%s"',
                request.method,
                request.path_qs[:300].replace('"', "%22"),
                response.status,
                sent if cache_read else _bytes_sent(request, response),
                time * 1000,
                outcome,
                request.remote,
                ua,
            )

    @property
    def enabled(self) -> bool:
        return True
