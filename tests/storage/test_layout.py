"""The layout upgrade on both backends: its refusal when it cannot tell where bare names
belong. (The store operations it uses, renames and the layout version, are in the store
contract: tests/storage/test_store.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import UpstreamConfig
from proxy.layout import LayoutError, upgrade
from proxy.reference import Digest
from proxy.routing import Namespaces
from proxy.storage import Store
from proxy.storage.backend import open_filesystem, open_s3
from tests.support.registry import free_port
from tests.support.seaweed import SeaweedFS, ensure_bucket

D1, D2 = Digest.of(b"one"), Digest.of(b"two")


@pytest.fixture(params=["filesystem", "s3"])
async def store(request, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "filesystem":
        yield open_filesystem(tmp_path / "data")[0]
        return
    seaweed: SeaweedFS = request.getfixturevalue("seaweedfs")
    async with open_s3(seaweed.s3_config()) as s3:
        await ensure_bucket(s3.driver.client)
        yield s3


async def test_bare_names_without_a_default_upstream_refuse_to_start(store: Store):
    await store.set_tag("library/a", "v1", D1)
    names = Namespaces({"ghcr.io": UpstreamConfig(name="ghcr.io", url="https://ghcr.io")}, None)
    with pytest.raises(LayoutError, match=r"proxy\.default_upstream"):
        await upgrade(store, names)
    assert await store.layout_version() is None  # nothing recorded: the next start retries


async def test_pushed_blobs_under_a_bare_unhosted_name_refuse_the_upgrade(store: Store):
    """Layout 1 linked blobs only to hosted repositories: a bare name holding some is hosted
    content whose pattern is missing from the config, and moving it would make it cache."""
    await store.set_tag("team/foo", "v1", D1)
    await store.link_blob("team/foo", D2)
    names = Namespaces({"docker.io": UpstreamConfig(name="docker.io", url="https://x")},
                       "docker.io")
    with pytest.raises(LayoutError, match=r"hosted\.repositories"):
        await upgrade(store, names)
    assert await store.get_tag("team/foo", "v1") == D1  # nothing moved
    assert await store.layout_version() is None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_stops_with_one_line_when_the_store_cannot_be_upgraded(tmp_path: Path, workers):
    import subprocess
    import sys

    repo = tmp_path / "data" / "repositories" / "team" / "foo"
    (repo / "_layers" / "sha256").mkdir(parents=True)
    (repo / "_layers" / "sha256" / D2.hex).touch()
    port = "0" if workers == "1" else str(free_port())  # (workers need a fixed port)
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--data-dir", str(tmp_path / "data"),
         "--listen", f"127.0.0.1:{port}", "--workers", workers],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "team/foo" in lines[0] and "hosted.repositories" in lines[0], lines


async def test_the_purge_marker_changes_with_each_purge(store: Store):
    assert await store.purge_marker() is None
    await store.mark_purge()
    first = await store.purge_marker()
    await store.mark_purge()
    assert first is not None and await store.purge_marker() not in (None, first)
