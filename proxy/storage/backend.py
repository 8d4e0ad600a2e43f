"""Opening the configured storage backend: a driver, the repository semantics over it,
and the local staging area."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config import Config, S3Config
from proxy.storage.base import Store
from proxy.storage.driver.filesystem import FilesystemDriver
from proxy.storage.registry import RegistryStore
from proxy.storage.staging import Staging

if TYPE_CHECKING:
    from proxy.storage.driver.s3 import S3Driver


def open_filesystem(root: Path, *, clean: bool = True
                    ) -> tuple[RegistryStore[FilesystemDriver], Staging]:
    """The filesystem backend on ``root``: its store, and its staging area on the same
    root (fills are renamed into the store). ``clean``: see :meth:`Staging.clean_tmp`."""
    driver = FilesystemDriver(root)
    driver.open()
    store = RegistryStore(driver)
    staging = Staging(root, store.local_path)
    staging.open(clean=clean)
    return store, staging


@asynccontextmanager
async def open_s3(config: S3Config) -> AsyncIterator[RegistryStore[S3Driver]]:
    """The S3 backend's store; its client's connections are closed on leaving."""
    from proxy.storage.driver.s3 import S3Driver  # aiobotocore only when it is used

    async with S3Driver(config) as driver:
        yield RegistryStore(driver)


@asynccontextmanager
async def open_store(config: Config, *, clean: bool = True
                     ) -> AsyncIterator[tuple[Store, Staging]]:
    """``(store, staging)``: where objects, manifests and tags live, and the local area
    whose ``tmp/``, ``locks/`` and ``uploads/`` hold what is being written. Both are on
    ``storage.root`` with the filesystem backend; with S3, the local one is only scratch
    space.

    ``clean`` removes what a crashed process left in ``tmp/`` (the parent process does it
    once; workers pass ``False``).
    """
    if config.s3 is None:
        yield open_filesystem(config.storage_root, clean=clean)
        return
    staging = Staging(config.storage_root)
    staging.open(clean=clean)
    async with open_s3(config.s3) as store:
        yield store, staging
