"""Shared fixtures: real docker-registry upstreams, an S3 server (SeaweedFS), Redis, HTTP
sessions, layer scratch dirs. Shared helpers are in tests/support/."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

# Make ``tests.support`` importable when pytest is run as ``pytest`` (not ``python -m pytest``).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.redisproc import RedisProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402
from tests.support.seaweed import SeaweedFS, start_seaweedfs  # noqa: E402


@pytest.fixture(scope="session")
def upstream_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A docker-registry shared by the whole session; do not stop it in tests."""
    with RegistryProcess(tmp_path_factory.mktemp("upstream-registry")) as reg:
        yield reg


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A private docker-registry for one test; it may be stopped and restarted freely."""
    with RegistryProcess(tmp_path / "fresh-registry") as reg:
        yield reg


@pytest.fixture
def tmp_layer_dir(tmp_path: Path) -> Path:
    """Scratch directory for generated layer files."""
    d = tmp_path / "layers"
    d.mkdir()
    return d


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp session (no proxy env, generous timeouts) for pushing test content."""
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        yield session


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A session for talking to an in-process proxy; bodies come as the proxy sent them
    (no decompression), as a registry client reads blobs."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the session, its bucket (``seaweed.BUCKET``) created.

    Tests share the bucket and keep apart by key prefix: ``seaweedfs.s3_config()`` gives
    settings under a fresh random prefix.
    """
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the session; tests use ``redis_url``, which empties it first."""
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """URL of the session's redis-server, emptied (FLUSHALL) for this test."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a test may have stopped it
    redis_server.flushall()
    return redis_server.url
