"""``/v2/``: the version check every client starts with."""

from __future__ import annotations

from aiohttp import web


async def version_check(request: web.Request) -> web.Response:
    """200 and an empty JSON object; the API version header is added to every response."""
    return web.Response(body=b"{}", content_type="application/json")
