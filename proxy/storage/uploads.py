"""Resumable blob uploads on disk (hosted repositories).

Each upload is a directory ``uploads/<uuid>/`` holding ``data`` (the bytes so far) and
``repo`` (the repository it belongs to). The state lives on disk so an upload survives a
restart; the running hash is kept in memory and rebuilt from ``data`` when missing.
Completing an upload verifies the digest; the store then publishes ``data`` (a rename into
``blobs/`` on the filesystem backend, a multipart upload on S3).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import BlobUploadUnknown, DigestInvalid
from proxy.reference import Digest
from proxy.storage.staging import Staging

_UUID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass
class Upload:
    """An upload in progress."""

    uuid: str
    repo: str
    path: Path  #: the upload's directory
    size: int
    started: float


class UploadStore:
    """Creates, appends to, completes and purges uploads under ``<root>/uploads``."""

    def __init__(self, staging: Staging) -> None:
        self.root = staging.root / "uploads"
        self._hashers: dict[str, hashlib._Hash] = {}

    def create(self, repo: str, owner: str = "") -> Upload:
        """A new, empty upload of ``repo``, opened by ``owner`` (a user or a client address,
        counted by :meth:`count_open`)."""
        uid = uuidlib.uuid4().hex
        path = self.root / uid
        path.mkdir(parents=True)
        (path / "data").touch()
        (path / "repo").write_text(repo)
        (path / "owner").write_text(owner)
        now = time.time()
        (path / "started").write_text(str(now))
        self._hashers[uid] = hashlib.sha256()
        return Upload(uid, repo, path, 0, now)

    def exists(self, uid: str) -> bool:
        """Whether upload ``uid`` is on this disk (of any repository)."""
        return _UUID_RE.fullmatch(uid) is not None and (self.root / uid / "repo").exists()

    def get(self, repo: str, uid: str) -> Upload:
        """The upload ``uid`` of ``repo``; BLOB_UPLOAD_UNKNOWN otherwise (also for bad ids)."""
        if not _UUID_RE.fullmatch(uid):
            raise BlobUploadUnknown(f"upload {uid[:80]!r} unknown")
        path = self.root / uid
        try:
            owner = (path / "repo").read_text()
            size = os.stat(path / "data").st_size
            started = float((path / "started").read_text() or 0)
        except (FileNotFoundError, ValueError):
            raise BlobUploadUnknown(f"upload {uid} unknown") from None
        if owner != repo:
            raise BlobUploadUnknown(f"upload {uid} does not belong to {repo}")
        return Upload(uid, repo, path, size, started)

    def _hasher(self, upload: Upload) -> hashlib._Hash:
        h = self._hashers.get(upload.uuid)
        if h is None:  # after a restart: rebuild the running hash from what is on disk
            h = _hash_file(upload.path / "data", hashlib.sha256())
            self._hashers[upload.uuid] = h
        return h

    def open_append(self, upload: Upload) -> tuple[int, hashlib._Hash]:
        """An fd positioned at the end of the upload's data, and its running hash."""
        hasher = self._hasher(upload)
        fd = os.open(upload.path / "data", os.O_WRONLY | os.O_APPEND)
        return fd, hasher

    def truncate(self, upload: Upload, size: int) -> None:
        """Roll back a chunk that failed half-way (client disconnect): keep ``size`` bytes."""
        os.truncate(upload.path / "data", size)
        self._hashers.pop(upload.uuid, None)

    def data_path(self, upload: Upload) -> Path:
        return upload.path / "data"

    def verify(self, upload: Upload, expected: Digest) -> int:
        """Check the upload's bytes against ``expected``; returns its size. The caller then
        publishes :meth:`data_path` with :meth:`Store.import_file` and deletes the upload."""
        data = upload.path / "data"
        size = os.stat(data).st_size
        if expected.algorithm == "sha256":
            actual = Digest("sha256", self._hasher(upload).hexdigest())
        else:
            h = _hash_file(data, expected.hasher())
            actual = Digest(expected.algorithm, h.hexdigest())
        if actual != expected:
            raise DigestInvalid(f"uploaded content has digest {actual}, not {expected}")
        return size

    def delete(self, upload: Upload) -> None:
        self._hashers.pop(upload.uuid, None)
        shutil.rmtree(upload.path, ignore_errors=True)

    def count_open(self, repo: str, owner: str) -> tuple[int, int]:
        """Uploads on this disk (every worker's) open in ``repo``, and opened by ``owner``.
        A scan: called once per new upload, never per chunk."""
        in_repo = by_owner = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                try:
                    in_repo += (Path(entry.path) / "repo").read_text() == repo
                    by_owner += bool(owner) and (Path(entry.path) / "owner").read_text() == owner
                except (FileNotFoundError, NotADirectoryError):
                    continue  # finished or purged meanwhile, or older than owners
        return in_repo, by_owner

    def purge(self, max_age: float) -> int:
        """Remove uploads started more than ``max_age`` seconds ago; returns how many."""
        removed = 0
        cutoff = time.time() - max_age
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                try:
                    started = float((Path(entry.path) / "started").read_text())
                except (FileNotFoundError, ValueError, NotADirectoryError):
                    # being created right now (``started`` comes last, and is empty for an
                    # instant while written), or damaged: the directory's own time
                    # decides, never "abandoned since 1970"
                    try:
                        started = entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
                if started < cutoff:
                    self._hashers.pop(entry.name, None)
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
        return removed


def _hash_file(path: Path, h: hashlib._Hash) -> hashlib._Hash:
    """``h`` updated with the bytes of ``path``, read in 1 MiB pieces."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h
