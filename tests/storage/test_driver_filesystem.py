"""The filesystem driver passes the driver contract, and leaves no temp file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.errors import DigestInvalid
from proxy.reference import Digest
from proxy.storage.driver.filesystem import FilesystemDriver
from tests.storage.driver_contract import DriverContract


class TestFilesystemDriver(DriverContract):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> FilesystemDriver:
        driver = FilesystemDriver(tmp_path / "root")
        driver.open()
        return driver


async def test_writes_go_through_tmp_and_leave_nothing_there(tmp_path: Path):
    driver = FilesystemDriver(tmp_path)
    driver.open()
    await driver.put("small", b"x")
    writer = driver.writer("big")
    await writer.write(b"y" * 1000)
    assert len(os.listdir(tmp_path / "tmp")) == 1  # the object being written
    await writer.commit(Digest.of(b"y" * 1000), 1000)
    failed = driver.writer("bad")
    await failed.write(b"z")
    with pytest.raises(DigestInvalid):
        await failed.commit(Digest.of(b"other"))
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(os.listdir(tmp_path / "blobs" / "sha256")) == [f"{i:02x}" for i in range(256)]


async def test_a_put_of_unchanged_bytes_does_not_rewrite_the_file(tmp_path: Path):
    """A confirmed tag gets a new mtime, not a new file (no fsync, no rename)."""
    driver = FilesystemDriver(tmp_path)
    driver.open()
    await driver.put("tag", b"sha256:abc")
    inode = os.stat(tmp_path / "tag").st_ino
    os.utime(tmp_path / "tag", (0, 0))
    await driver.put("tag", b"sha256:abc")
    st = os.stat(tmp_path / "tag")
    assert st.st_ino == inode and st.st_mtime > 0
