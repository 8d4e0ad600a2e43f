"""The ``upstream_url`` fixture the fake-upstream tests share: each module's own ``fake``
(its knobs differ: ranges, a stall, a referrers API) served in-process."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import serve_app


@pytest.fixture
async def upstream_url(aiohttp_server: Any, fake: FakeUpstream) -> str:
    """Base URL of the module's ``fake`` upstream."""
    return await serve_app(aiohttp_server, fake.app())
