"""A test's view into a proxy's local store, through the store's own API: no test spells
out the on-disk layout except the layout's own (tests/storage/test_layout.py), so the
layout can change in one place."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from proxy.reference import Digest
from proxy.storage import RegistryStore, Staging
from proxy.storage.driver.filesystem import FilesystemDriver


def local_store(data: Path) -> RegistryStore[FilesystemDriver]:
    """The filesystem store at ``data`` (a proxy's data directory), not opened."""
    return RegistryStore(FilesystemDriver(data))


def blob_path(data: Path, digest: str) -> Path:
    """Where the store at ``data`` keeps (or would keep) the blob ``digest``."""
    path = local_store(data).local_path(Digest.parse(digest))
    assert path is not None  # (a filesystem store's objects are local files)
    return Path(path)


def is_stored(data: Path, digest: str) -> bool:
    return blob_path(data, digest).is_file()


async def stored_blobs(data: Path) -> dict[str, int]:
    """Every blob the store at ``data`` holds, with its size."""
    return {str(stat.digest): stat.size async for stat in local_store(data).blob_stats()}


def tmp_files(data: Path) -> list[str]:
    """What is in the store's scratch directory (fills in progress, their hints)."""
    return os.listdir(Staging(data).tmp_dir)


async def stored_tag(data: Path, repo: str, tag: str) -> str | None:
    """The digest the store at ``data`` has for ``repo:tag`` (a stored repository name)."""
    digest = await local_store(data).get_tag(repo, tag)
    return None if digest is None else str(digest)


async def wait_until(condition: Callable[[], bool], what: str, patience: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``patience`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not within {patience} s: {what}")
        await asyncio.sleep(0.01)


async def wait_stored(data: Path, *digests: str, patience: float = 10.0) -> None:
    """Wait until every digest is in the store: a client has its last byte once the digest
    is verified, and the fsync and rename into the store follow right after."""
    await wait_until(lambda: all(is_stored(data, d) for d in digests),
                     f"{', '.join(digests)} stored", patience)


async def wait_tmp_empty(data: Path, patience: float = 10.0) -> None:
    """Wait until the scratch directory is empty: a fill publishes or aborts (and drops
    its hint files) just after its clients got their last byte."""
    await wait_until(lambda: not tmp_files(data), "tmp/ emptied", patience)


async def is_manifest_stored(data: Path, digest: str) -> bool:
    return await local_store(data).has_manifest(Digest.parse(digest))


async def put_tag(data: Path, repo: str, tag: str, digest: str) -> None:
    """Tag ``digest`` as ``repo:tag`` in the (opened) store at ``data``, as a push would."""
    await local_store(data).set_tag(repo, tag, Digest.parse(digest))
