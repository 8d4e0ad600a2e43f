"""The ``store`` fixture the storage tests share: a fresh :class:`RegistryStore` on each
backend (the filesystem, and S3 on the suite's SeaweedFS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.storage import RegistryStore
from proxy.storage.backend import open_filesystem, open_s3
from tests.support.seaweed import SeaweedFS, ensure_bucket


@pytest.fixture(params=["filesystem", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RegistryStore]:
    if request.param == "filesystem":
        yield open_filesystem(tmp_path / "data")[0]
        return
    seaweed: SeaweedFS = request.getfixturevalue("seaweedfs")
    async with open_s3(seaweed.s3_config()) as s3:
        await ensure_bucket(s3.driver.client)
        yield s3
