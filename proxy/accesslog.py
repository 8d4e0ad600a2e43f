"""One structured (logfmt) access-log line per request, with the cache outcome."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse


class AccessLogger(AbstractAccessLogger):
    """``method= path= status= bytes= duration_ms= cache= remote= ua=`` per request.

    It runs in aiohttp's own logging hook, which is cheaper than a middleware.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        ua = request.headers.get("User-Agent", "-").replace('"', "'")[:120]
        self.logger.info(
            'method=%s path="%s" status=%d bytes=%d duration_ms=%.1f cache=%s remote=%s ua="%s"',
            request.method,
            request.path_qs[:300].replace('"', "%22"),
            response.status,
            response.body_length,
            time * 1000,
            request.get("cache", "-"),
            request.remote,
            ua,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
