"""Per-request bookkeeping: one access-log line (logfmt, or JSON fields) and the request
metrics.

Both run in aiohttp's access-log hook, which is cheaper than a middleware. A request only
bumps one tally entry (its latency as a count in its histogram bucket); the metrics and
the status page's statistics get the tally at the metrics' next flush (each second, and
before ``/metrics`` or the status page renders): five counter updates per request cost
~7 % of a cached manifest GET.
What only the log line needs (a request id, upstream notes) is gathered only while
the access log is on.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import re
import secrets
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, Request, RequestKey, ResponseKey, StreamResponse
from multidict import CIMultiDict, istr

from proxy import metrics, requestnotes
from proxy.handlers.common import CACHE_OUTCOME, ERROR, REPO, USER
from proxy.logsetup import FIELDS
from proxy.requestnotes import UpstreamNotes
from proxy.results import NO_OUTCOME, CacheOutcome
from proxy.stats import CACHE_OUTCOMES, STATS, UNCOUNTED_OUTCOMES
from proxy.timeseries import SERIES, UNCOUNTED_HANDLERS, make_row
from proxy.upstreamactivity import ACTIVITY

#: Set on a response whose request gets no access-log line (it is counted in the metrics):
#: requests aiohttp could not parse, which are reported rate-limited instead.
UNLOGGED = ResponseKey("unlogged", bool)

#: The request's id, sent back to the client and logged: the client's own when it is a
#: safe token (a proxy in front may have assigned it), else a fresh one.
REQUEST_ID = istr("X-Request-Id")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}").fullmatch
#: Notes of the layers below the handler (the upstream's answer), when the log is on.
NOTES = RequestKey("regproxy.notes", UpstreamNotes)


class _Ids:
    """Request ids unique across processes and restarts: a random prefix per process (new
    after a fork: workers) and a counter, cheaper than random bytes per request."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.counter = itertools.count(1)

    def new(self) -> str:
        return f"{self.prefix}-{next(self.counter):x}"


_IDS = _Ids()


def set_request_id(request: Request, headers: CIMultiDict[str]) -> None:
    """The ``X-Request-Id`` header of a response (set with the access log on)."""
    rid = request.headers.get(REQUEST_ID)
    headers[REQUEST_ID] = rid if rid is not None and _SAFE_ID(rid) else _IDS.new()


def start_request(request: BaseRequest) -> BaseRequest:
    """Request-factory hook (with the access log on): the request's upstream notes."""
    request[NOTES] = requestnotes.begin()
    return request


def _quoted(value: str, limit: int) -> str:
    """A logfmt value: within quotes, without quotes or line breaks of its own."""
    return '"' + value[:limit].replace('"', "'").replace("\n", " ").replace("\r", " ") + '"'


#: Handlers whose requests are cache reads, and the kind they count as.
_CACHE_KINDS = {"get_manifest": "manifest", "get_blob": "blob"}
#: Cache outcomes whose bytes needed no upstream transfer of their own ("saved").
_SAVED = frozenset((*CACHE_OUTCOMES, CacheOutcome.STALE, CacheOutcome.COALESCED))
#: Where the fields of a pending entry are: requests, body bytes sent, seconds, then one
#: count per latency bucket.
_REQUESTS, _SENT, _SECONDS, _BUCKETS = 0, 1, 2, 3
_ENTRY_SIZE = _BUCKETS + len(metrics.LATENCY_BUCKETS) + 1
_LATENCY_BOUNDS = metrics.LATENCY_BUCKETS
_bucket = bisect.bisect_left  # the index of a latency's bucket (as metrics.latency_bucket)


#: Requests not yet counted, by (handler, method, status, cache outcome, repository):
#: see the fields above. The repository is kept for cache and hosted reads only.
_PENDING: dict[tuple[str, str, int, CacheOutcome, str | None], list[float]] = {}


def fold() -> None:
    """Move the pending request counts into the metrics, the status statistics and the
    console's time series."""
    row = make_row()  # (this second's row of the time series)
    while _PENDING:
        (handler, method, status, outcome, repo), entry = _PENDING.popitem()
        requests, sent = int(entry[_REQUESTS]), int(entry[_SENT])
        metrics.count(metrics.REQUESTS, handler, method, status, amount=requests)
        buckets = [int(n) for n in entry[_BUCKETS:]]
        metrics.child(metrics.REQUEST_LATENCY, handler, outcome).add(buckets, entry[_SECONDS])
        if handler not in UNCOUNTED_HANDLERS:
            _add_to_row(row, handler, method, status, outcome, requests, sent, buckets)
        kind = _CACHE_KINDS.get(handler)
        if kind is None or outcome == CacheOutcome.NONE:
            continue
        body = method == "GET" and status in (200, 206)
        if outcome == CacheOutcome.HOSTED:  # served from the store, but no cache read
            STATS.record(repo, None, sent, requests=requests)
            if kind == "blob" and body:
                metrics.count(metrics.BYTES_SERVED, "hosted", amount=sent)
            continue
        metrics.count(metrics.CACHE, kind, outcome, amount=requests)
        STATS.record(repo, outcome, sent, requests=requests)
        if body and outcome in _SAVED:
            metrics.count(metrics.BYTES_SAVED, kind, amount=sent)
        if kind == "blob" and body:
            source = "cache" if outcome == CacheOutcome.HIT else "upstream"
            metrics.count(metrics.BYTES_SERVED, source, amount=sent)
    ACTIVITY.fold()
    row[_ROW_UPSTREAM_BYTES] = ACTIVITY.take_bytes()
    SERIES.add(row)


#: Where :func:`proxy.timeseries.make_row` keeps what :func:`_add_to_row` adds.
_ROW_REQUESTS, _ROW_HITS, _ROW_MISSES, _ROW_CACHE, _ROW_UPSTREAM, _ROW_UPSTREAM_BYTES = range(6)


def _add_to_row(row: list[int], handler: str, method: str, status: int,
                outcome: CacheOutcome, requests: int, sent: int, buckets: list[int]) -> None:
    """Count a pending entry in the time series' row: requests and their latencies; for
    cache reads hits and misses (as the hit ratio counts them) and the blob bytes: those
    that needed no upstream transfer of their own (as ``regproxy_bytes_saved_total``) and
    the others."""
    row[_ROW_REQUESTS] += requests
    for i, n in enumerate(buckets):
        row[_ROW_UPSTREAM_BYTES + 1 + i] += n
    if handler not in _CACHE_KINDS or outcome in (CacheOutcome.NONE, CacheOutcome.HOSTED):
        return
    if outcome in CACHE_OUTCOMES:
        row[_ROW_HITS] += requests
    elif outcome not in UNCOUNTED_OUTCOMES:
        row[_ROW_MISSES] += requests
    if handler == "get_blob" and method == "GET" and status in (200, 206):
        row[_ROW_CACHE if outcome in _SAVED else _ROW_UPSTREAM] += sent


metrics.add_source(fold)


def _bytes_sent(request: BaseRequest, response: StreamResponse) -> int:
    """Body bytes sent. aiohttp's count includes the header block, so a body of known
    length counts as at most that (``sendfile`` spans are added to the count as sent)."""
    if request.method == "HEAD":
        return 0
    length = response.content_length
    return response.body_length if length is None else min(length, response.body_length)


class AccessLogger(AbstractAccessLogger):
    """One line per request, logged when the ``regproxy.access`` logger is enabled for
    INFO; metrics are always recorded. ``log_format`` is ``"json"`` for JSON fields (see
    :mod:`proxy.logsetup`), anything else for a logfmt line (``method= path= status= bytes=
    duration_ms= cache= remote= ua= request_id=`` and, when known, ``user=
    upstream_status= upstream_ms= upstream_error= error=``)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        try:
            handler: str = request.match_info.route.handler.__name__  # type: ignore[attr-defined]
        except (AttributeError, AssertionError):  # failed before routing (bad request line)
            handler = "none"
        outcome = request.get(CACHE_OUTCOME, NO_OUTCOME)
        cache_read = outcome != NO_OUTCOME and handler in _CACHE_KINDS
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
            self._line(request, response, time, outcome,
                       sent if cache_read else _bytes_sent(request, response))

    def _line(self, request: BaseRequest, response: StreamResponse, time: float, outcome: CacheOutcome,
              sent: int) -> None:
        notes = request.get(NOTES)
        upstream_ms = None if notes is None or notes.ms is None else round(notes.ms, 1)
        if self.log_format == "json":
            fields: dict[str, Any] = {
                "method": request.method, "path": request.path_qs[:2000],
                "status": response.status, "bytes": sent, "duration_ms": round(time * 1000, 1),
                "cache": outcome, "remote": request.remote,
                "ua": request.headers.get("User-Agent", "")[:300],
                "request_id": response.headers.get(REQUEST_ID), "user": request.get(USER),
                "upstream_status": None if notes is None else notes.status,
                "upstream_ms": upstream_ms,
                "upstream_error": None if notes is None else notes.error,
                "error": request.get(ERROR),
            }
            self.logger.info("%s %s %d", request.method, fields["path"], response.status,
                             extra={FIELDS: fields})
            return
        line = (f'method={request.method} path="{request.path_qs[:300].replace(chr(34), "%22")}" '
                f"status={response.status} bytes={sent} duration_ms={time * 1000:.1f} "
                f"cache={outcome} remote={request.remote} "
                f"ua={_quoted(request.headers.get('User-Agent', '-'), 120)} "
                f"request_id={response.headers.get(REQUEST_ID, '-')}")
        user = request.get(USER)
        if user is not None:
            line += f" user={_quoted(user, 100)}"
        if notes is not None:
            if notes.status is not None:
                line += f" upstream_status={notes.status}"
            if upstream_ms is not None:
                line += f" upstream_ms={upstream_ms:.1f}"
            if notes.error is not None:
                line += f" upstream_error={_quoted(notes.error, 300)}"
        error = request.get(ERROR)
        if error is not None:
            line += f" error={_quoted(error, 300)}"
        self.logger.info(line)

    @property
    def enabled(self) -> bool:
        return True
