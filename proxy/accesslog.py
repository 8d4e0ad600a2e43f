"""One structured (logfmt) access-log line per request, with the cache outcome."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, FileResponse, StreamResponse


def _bytes_sent(request: BaseRequest, response: StreamResponse) -> int:
    """Body bytes sent; sendfile bypasses aiohttp's counter, so file responses use their length."""
    if isinstance(response, FileResponse) and request.method != "HEAD":
        return response.content_length or 0
    return response.body_length


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
            _bytes_sent(request, response),
            time * 1000,
            request.get("cache", "-"),
            request.remote,
            ua,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
