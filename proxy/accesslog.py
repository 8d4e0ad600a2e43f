"""Per-request bookkeeping: one logfmt access-log line and the request metrics.

Both run in aiohttp's access-log hook, which is cheaper than a middleware.
"""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, FileResponse, StreamResponse

from proxy import metrics
from proxy.handlers.common import CACHE_OUTCOME, REPO
from proxy.stats import STATS

#: Handlers whose requests are cache reads, and the kind they count as.
_CACHE_KINDS = {"get_manifest": "manifest", "get_blob": "blob"}


def _bytes_sent(request: BaseRequest, response: StreamResponse) -> int:
    """Body bytes sent. aiohttp's count includes the header block, so a body of known
    length counts as at most that; file responses bypass the count (sendfile)."""
    if request.method == "HEAD":
        return 0
    length = response.content_length
    if isinstance(response, FileResponse):
        return length or 0
    return response.body_length if length is None else min(length, response.body_length)


class AccessLogger(AbstractAccessLogger):
    """``method= path= status= bytes= duration_ms= cache= remote= ua=`` per request, logged
    when the ``regproxy.access`` logger is enabled for INFO; metrics are always recorded."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        match_info = getattr(request, "match_info", None)
        route = getattr(getattr(match_info, "route", None), "handler", None)
        handler = getattr(route, "__name__", "none")
        sent = _bytes_sent(request, response)
        outcome = request.get(CACHE_OUTCOME, "-")
        status = response.status
        metrics.count(metrics.REQUESTS, handler, request.method, status)
        kind = _CACHE_KINDS.get(handler)
        if kind is not None and outcome != "-":
            metrics.count(metrics.CACHE, kind, outcome)
            STATS.record(request.get(REPO), outcome, sent if request.method == "GET" else 0)
            if kind == "blob" and request.method == "GET" and response.status in (200, 206):
                source = "cache" if outcome == "hit" else "upstream"
                metrics.count(metrics.BYTES_SERVED, source, amount=sent)
        if self.logger.isEnabledFor(logging.INFO):
            ua = request.headers.get("User-Agent", "-").replace('"', "'")[:120]
            self.logger.info(
                'method=%s path="%s" status=%d bytes=%d duration_ms=%.1f cache=%s remote=%s ua="%s"',
                request.method,
                request.path_qs[:300].replace('"', "%22"),
                response.status,
                sent,
                time * 1000,
                outcome,
                request.remote,
                ua,
            )

    @property
    def enabled(self) -> bool:
        return True
