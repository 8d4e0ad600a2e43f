"""The filesystem backend's staging mechanics: writing many buffers, reading a fill around
its publication, lock files and their clean-up at start-up."""

from __future__ import annotations

import fcntl
import hashlib
import os

import pytest

from proxy.reference import Digest
from proxy.storage.backend import open_filesystem
from proxy.storage.localfs import same_file


def test_write_many_takes_more_buffers_than_one_writev_allows(tmp_path):
    """A batch of many small socket reads (a slow network) is more than IOV_MAX buffers."""
    _, store = open_filesystem(tmp_path)
    chunks = [os.urandom(1 + i % 1500) for i in range(3000)]
    data = b"".join(chunks)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    writer = store.claim_fill(digest)
    assert writer is not None
    writer.write_many(chunks)
    writer.verify(digest, len(data))
    assert writer.publish(digest).read_bytes() == data


def test_a_fill_file_is_readable_at_either_path_around_its_publication(tmp_path):
    """Joiners open a fill's file by its temp path; publishing (a thread) may have renamed
    it into the store a moment before: the same bytes are then read from there."""
    objects, store = open_filesystem(tmp_path)
    data = os.urandom(5000)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    writer = store.claim_fill(digest)
    assert writer is not None
    writer.write(data)
    before = writer.open_reader(digest)
    writer.verify(digest, len(data))
    writer.publish(digest)
    writer.path.write_bytes(b"")  # a sibling worker's new fill of the same digest
    after = writer.open_reader(digest)
    try:
        assert os.pread(before, 10_000, 0) == os.pread(after, 10_000, 0) == data
    finally:
        os.close(before)
        os.close(after)
    writer.path.unlink()
    os.unlink(objects.local_path(digest))
    with pytest.raises(FileNotFoundError):
        writer.open_reader(digest)


def test_try_lock_is_exclusive_and_a_lock_on_a_removed_file_does_not_count(tmp_path):
    _, store = open_filesystem(tmp_path)
    with store.try_lock("tag:a") as first:
        assert first
        (path,) = (tmp_path / "locks").iterdir()
        with store.try_lock("tag:a") as second, store.try_lock("tag:b") as other:
            assert not second and other
        late = os.open(path, os.O_RDWR)  # opened just before the holder finishes
    try:
        assert not list((tmp_path / "locks").iterdir())
        fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free, but on a removed file
        assert not same_file(late, path)
        with store.try_lock("tag:a") as third:
            assert third  # the next one takes a new file
    finally:
        os.close(late)


def test_start_up_cleaning_removes_free_lock_files_only(tmp_path):
    _, store = open_filesystem(tmp_path)
    (tmp_path / "locks" / "left-by-a-killed-process").touch()
    with store.try_lock("evict") as held:
        assert held
        store.clean_tmp()
        assert [p.name for p in (tmp_path / "locks").iterdir()] != []  # the held one stays
        assert not (tmp_path / "locks" / "left-by-a-killed-process").exists()
        with store.try_lock("evict") as again:
            assert not again  # and still excludes
    assert os.listdir(tmp_path / "locks") == []
