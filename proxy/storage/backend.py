"""Opening the configured storage backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.config import Config
from proxy.storage.base import Store
from proxy.storage.filesystem import FilesystemStore


@asynccontextmanager
async def open_store(config: Config, *, clean: bool = True
                     ) -> AsyncIterator[tuple[Store, FilesystemStore]]:
    """``(store, staging)``: where objects, manifests and tags live, and the local store
    whose ``tmp/`` and ``uploads/`` hold what is being written. They are one and the same
    on the filesystem backend; with S3, the local one is only scratch space.

    ``clean`` removes what a crashed process left in ``tmp/`` (the parent process does it
    once; workers pass ``False``).
    """
    staging = FilesystemStore(config.storage_root)
    staging.open(clean=clean)
    if config.s3 is None:
        yield staging, staging
        return
    from proxy.storage.s3 import S3Store  # aiobotocore only when it is used

    async with S3Store(config.s3) as s3:
        yield s3, staging
