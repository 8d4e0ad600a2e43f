"""The S3 driver: objects in one bucket of S3-compatible storage (AWS S3, MinIO, SeaweedFS,
...), via aiobotocore; a building block for scale-out, several proxy hosts sharing one
bucket instead of one local disk. Keys are object keys below ``<prefix>/``; two key spaces
are the driver's own::

    _uploads/<random>     objects being written (multipart uploads in progress)
    access/<alg>/<hex>    last use of blobs/<alg>/<hex[:2]>/<hex> (S3 cannot touch an object)

Nothing appears at a key before its digest and size were checked. Large objects stream
into a multipart upload under a temp key as they arrive (at most two parts in memory: one
filling, one uploading); ``commit`` checks the digest and size, completes the upload, and
server-side copies the object to its final key, which is atomic for readers. An object
that fits in one part skips the multipart upload and is PUT straight to its final key once
verified (a PUT is atomic too).

Limits: ``CopyObject`` copies at most 5 GiB, so bigger blobs are refused while being written
(a multipart ``UploadPartCopy`` would lift that). A crash leaves incomplete multipart
uploads and ``_uploads/`` objects behind: give the bucket a lifecycle rule that aborts
incomplete multipart uploads and expires ``<prefix>/_uploads/`` after a day. Presigned
URLs point at ``endpoint_url``, which clients must be able to reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError

from proxy.config import S3Config
from proxy.errors import BlobUploadInvalid, DigestInvalid, SizeInvalid
from proxy.reference import Digest
from proxy.storage.driver.base import Content, FileInfo

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_COPY_SIZE = 5 * 1024 * MiB  # CopyObject's limit
READ_CHUNK = 256 * 1024
#: How long a presigned URL is valid (seconds).
URL_EXPIRES = 300
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(exc: ClientError) -> bool:
    """Whether S3 answered "no such object" (servers differ in how they say it)."""
    return _error_code(exc) in _NOT_FOUND or _status(exc) == 404


def use_key(key: str) -> str:
    """Where uses of ``key`` are recorded: ``access/<alg>/<hex>`` for a blob
    ``blobs/<alg>/<hex[:2]>/<hex>`` (the layout's, kept by existing buckets), else
    ``access/<key>``."""
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == "blobs":
        return f"access/{parts[1]}/{parts[3]}"
    return f"access/{key}"


class S3Writer:
    """Streams one object into a multipart upload under a temp key, hashing as it goes.

    Part uploads overlap with filling the next part (the caller is still reading its
    upstream meanwhile) but never more than one is in flight, so memory stays below two
    parts: :attr:`max_held` records the peak, for tests and metrics.
    """

    def __init__(self, driver: S3Driver, key: str, algorithm: str = "sha256", *,
                 verify: bool = True) -> None:
        self._client = driver.client
        self._bucket = driver.config.bucket
        self._part_size = driver.config.part_size
        self._final = driver.config.key(key)
        self.temp_key = driver.config.key(f"_uploads/{secrets.token_hex(16)}")
        self._algorithm = algorithm
        # no verify: the caller hashes and verifies the same bytes itself (a fill's local
        # temp file does), so commit checks only the size
        self._hash = hashlib.new(algorithm) if verify else None
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._inflight: asyncio.Task[None] | None = None
        self._inflight_size = 0
        self._done = False
        self.size = 0
        self.max_held = 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; a full part goes to S3 while the next one fills."""
        if self._done:
            raise RuntimeError("writer already committed or aborted")
        view = memoryview(data).cast("B")
        if self.size + len(view) > MAX_COPY_SIZE:
            raise BlobUploadInvalid("blobs over 5 GiB are not supported by the S3 backend")
        if self._hash is not None:
            self._hash.update(view)
        self.size += len(view)
        while view:
            room = self._part_size - len(self._buf)
            self._buf += view[:room]
            view = view[room:]
            self.max_held = max(self.max_held, len(self._buf) + self._inflight_size)
            if len(self._buf) >= self._part_size:
                await self._send_part()

    def digest(self) -> Digest:
        assert self._hash is not None, "a writer without verify does not hash"
        return Digest(self._algorithm, self._hash.hexdigest())

    async def _send_part(self) -> None:
        """Hand the full buffer to a background part upload (after the previous one ended)."""
        await self._wait_inflight()
        if self._upload_id is None:
            resp = await self._client.create_multipart_upload(Bucket=self._bucket, Key=self.temp_key)
            self._upload_id = resp["UploadId"]
        part, self._buf = self._buf, bytearray()
        number = len(self._parts) + 1
        self._parts.append({"PartNumber": number})
        self._inflight_size = len(part)
        self._inflight = asyncio.create_task(self._upload_part(number, part))

    async def _upload_part(self, number: int, body: bytearray) -> None:
        resp = await self._client.upload_part(
            Bucket=self._bucket, Key=self.temp_key, UploadId=self._upload_id,
            PartNumber=number, Body=body, ContentLength=len(body),
        )
        self._parts[number - 1]["ETag"] = resp["ETag"]

    async def _wait_inflight(self) -> None:
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            try:
                await task
            finally:
                self._inflight_size = 0

    async def commit(self, expected: Digest, expected_size: int | None = None) -> None:
        """Verify, then make the object visible under its key.

        The digest is checked before anything is completed, so a bad blob never becomes
        an object at all; the stored size is checked again before the copy.
        """
        if self._done:
            raise RuntimeError("writer already committed or aborted")
        try:
            if expected_size is not None and self.size != expected_size:
                raise SizeInvalid(f"got {self.size} bytes, expected {expected_size}")
            if self._hash is not None and (
                    expected.algorithm != self._algorithm or self.digest() != expected):
                raise DigestInvalid(f"content digest {self.digest()} does not match {expected}")
            if self._upload_id is None:  # fits in one part: a verified PUT is atomic
                await self._client.put_object(
                    Bucket=self._bucket, Key=self._final, Body=self._buf,
                    ContentLength=len(self._buf),
                )
                self._buf = bytearray()
                self._done = True
                return
            if self._buf:
                await self._send_part()
            await self._wait_inflight()
            await self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=self.temp_key, UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
            self._upload_id = None  # completed: from here on, clean up the temp object
            head = await self._client.head_object(Bucket=self._bucket, Key=self.temp_key)
            if head["ContentLength"] != self.size:
                raise SizeInvalid(f"object store holds {head['ContentLength']} bytes, sent {self.size}")
            await self._client.copy_object(
                Bucket=self._bucket, Key=self._final,
                CopySource={"Bucket": self._bucket, "Key": self.temp_key},
            )
            await self._client.delete_object(Bucket=self._bucket, Key=self.temp_key)
            self._done = True
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        """Drop everything written so far; nothing becomes visible. Safe to call twice."""
        self._done = True
        self._buf = bytearray()
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(BaseException):
                await self._wait_inflight()
        with contextlib.suppress(ClientError):
            if self._upload_id is not None:
                upload_id, self._upload_id = self._upload_id, None
                await self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self.temp_key, UploadId=upload_id,
                )
            elif self._parts:  # completed but not copied: remove the temp object
                await self._client.delete_object(Bucket=self._bucket, Key=self.temp_key)


class S3Driver:
    """Objects in one bucket; one aiobotocore client per driver.

    Use as ``async with S3Driver(config) as driver:`` so the client's connection pool
    is opened once and closed on shutdown.
    """

    local = False

    def __init__(self, config: S3Config) -> None:
        if config.part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
        self.config = config
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Driver used outside 'async with'")
        return self._client

    async def __aenter__(self) -> S3Driver:
        cfg = self.config
        style = cfg.addressing_style or ("path" if cfg.endpoint_url else "auto")
        # Our own sha256 check covers integrity; botocore's default CRC checksums
        # (1.36+) are not understood by every S3-compatible server.
        options: dict[str, Any] = {"signature_version": "s3v4", "s3": {"addressing_style": style},
                                   "retries": {"max_attempts": 3, "mode": "standard"}}
        if "request_checksum_calculation" in Config.OPTION_DEFAULTS:  # botocore >= 1.36
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        aio_config = AioConfig(**options)
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(get_session().create_client(
            "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region,
            aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key,
            config=aio_config,
        ))
        self._stack = stack
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.settle()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def settle(self) -> None:
        """Wait (up to 5 s) for the use records :meth:`touch` writes in the background."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)

    def object_key(self, key: str) -> str:
        """The bucket's key for ``key`` (below the prefix)."""
        return self.config.key(key)

    # -- requests ----------------------------------------------------------------------

    async def _head(self, key: str) -> dict[str, Any] | None:
        """An object's metadata (HEAD), ``None`` if absent."""
        try:
            head: dict[str, Any] = await self.client.head_object(Bucket=self.config.bucket,
                                                                 Key=self.config.key(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return head

    async def _list(self, prefix: str, *, delimiter: bool = False
                    ) -> AsyncIterator[tuple[str, int, float]]:
        """``(key relative to prefix, size, mtime)`` of objects, or of "directories" (size -1)
        with ``delimiter``."""
        full = self.config.key(prefix)
        kwargs: dict[str, Any] = {"Bucket": self.config.bucket, "Prefix": full}
        if delimiter:
            kwargs["Delimiter"] = "/"
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(**kwargs):
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"][len(full):].rstrip("/"), -1, 0.0
            for obj in page.get("Contents", []):
                yield obj["Key"][len(full):], int(obj["Size"]), obj["LastModified"].timestamp()

    async def _put(self, key: str, data: bytes = b"") -> None:
        await self.client.put_object(Bucket=self.config.bucket, Key=self.config.key(key),
                                     Body=data, ContentLength=len(data))

    async def _drop(self, key: str) -> None:
        """Delete an object whether or not it exists (one request)."""
        await self.client.delete_object(Bucket=self.config.bucket, Key=self.config.key(key))

    # -- the driver protocol -----------------------------------------------------------

    def local_path(self, key: str) -> str | None:
        return None

    async def stat(self, key: str, *, last_use: bool = False) -> FileInfo | None:
        """A HEAD; with ``last_use``, a second one of the use record."""
        head = await self._head(key)
        if head is None:
            return None
        mtime = float(head["LastModified"].timestamp())
        if last_use:
            used = await self._head(use_key(key))
            if used is not None:
                mtime = max(mtime, float(used["LastModified"].timestamp()))
        return FileInfo(int(head["ContentLength"]), mtime)

    async def get(self, key: str) -> Content | None:
        try:
            resp = await self.client.get_object(Bucket=self.config.bucket, Key=self.config.key(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        async with resp["Body"] as body:
            data = await body.read()
        return Content(bytes(data), resp["LastModified"].timestamp())

    async def put(self, key: str, data: bytes) -> None:
        """One PUT (atomic); rewriting unchanged bytes refreshes LastModified, the time a
        tag was last confirmed, which replicas share."""
        await self._put(key, data)

    async def mark(self, key: str) -> None:
        await self._put(key)

    async def read(self, key: str, start: int = 0, end: int | None = None
                   ) -> AsyncIterator[bytes]:
        """A ranged GET (``start`` past the end: nothing), read in chunks."""
        if end is not None and end <= start:
            return
        rng = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        try:
            resp = await self.client.get_object(Bucket=self.config.bucket,
                                                Key=self.config.key(key), Range=rng)
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no object {key}") from exc
            if _error_code(exc) == "InvalidRange" or _status(exc) == 416:
                return
            raise
        body = resp["Body"]
        try:
            while chunk := await body.read(READ_CHUNK):
                yield bytes(chunk)
        finally:
            body.close()

    def writer(self, key: str, algorithm: str = "sha256", *, verify: bool = True
               ) -> S3Writer:
        return S3Writer(self, key, algorithm, verify=verify)

    async def publish_file(self, path: Path, key: str, digest: Digest, size: int) -> None:
        """Upload the file through a verifying writer (reads in a thread)."""
        writer = self.writer(key, digest.algorithm)
        loop = asyncio.get_running_loop()
        with open(path, "rb") as fh:  # noqa: ASYNC230 (reads go to a thread below)
            try:
                while chunk := await loop.run_in_executor(None, fh.read, self.config.part_size):
                    await writer.write(chunk)
                await writer.commit(digest, size)
            except BaseException:
                await writer.abort()
                raise

    async def list(self, prefix: str) -> list[str]:
        return [name async for name, _, _ in self._list(f"{prefix}/", delimiter=True)]

    async def walk(self, prefix: str, *, prune: Callable[[str], bool] | None = None,
                   last_use: bool = False) -> AsyncIterator[tuple[str, FileInfo | None]]:
        """One listing of every object below ``prefix`` (S3 has no directories: they are
        made up from the keys, and a pruned one's objects are skipped, not left unlisted);
        with ``last_use``, one of the use records first."""
        used: dict[str, float] = {}
        if last_use:
            async for rel, _, mtime in self._list("access/"):
                used[f"access/{rel}"] = mtime
        seen: set[str] = set()
        pruned: set[str] = set()
        async for rel, size, mtime in self._list(f"{prefix}/"):
            key = f"{prefix}/{rel}"
            directory, skip = prefix, False
            for part in rel.split("/")[:-1]:
                directory = f"{directory}/{part}"
                if directory in pruned:
                    skip = True
                    break
                if directory not in seen:
                    seen.add(directory)
                    yield directory, None
                    if prune is not None and prune(directory):
                        pruned.add(directory)
                        skip = True
                        break
            if not skip:
                yield key, FileInfo(size, max(mtime, used.get(use_key(key), 0.0)))

    async def move(self, src: str, dst: str) -> None:
        """A copy of each object (S3 has no rename), then a delete of the original."""
        async for rel, _, _ in self._list(f"{src}/"):
            source, target = f"{src}/{rel}", f"{dst}/{rel}"
            if await self._head(target) is None:
                await self.client.copy_object(
                    Bucket=self.config.bucket, Key=self.config.key(target),
                    CopySource={"Bucket": self.config.bucket, "Key": self.config.key(source)})
            await self._drop(source)

    async def delete(self, key: str) -> None:
        """One DELETE (absent is no error); a blob's use record goes with it."""
        await self._drop(key)
        if key.startswith("blobs/"):
            await self._drop(use_key(key))

    async def touch(self, key: str) -> None:
        """A tiny use record (its LastModified), written in the background: S3 cannot change
        an object's mtime, and a hit must not wait for a PUT."""
        task = asyncio.create_task(self._put(use_key(key)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def url(self, key: str) -> str | None:
        """A presigned GET, valid for :data:`URL_EXPIRES` seconds, when ``redirect`` is on:
        clients then fetch the bytes from the object store instead of through the proxy."""
        if not self.config.redirect:
            return None
        url: str = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": self.config.key(key)},
            ExpiresIn=URL_EXPIRES,
        )
        return url

    async def check(self) -> str | None:
        try:
            async with asyncio.timeout(3):
                await self.client.head_bucket(Bucket=self.config.bucket)
        except Exception as exc:
            return f"bucket {self.config.bucket}: {type(exc).__name__}"
        return None

    async def purge_incomplete(self, older_than: float) -> int:
        """Abort multipart uploads under ``_uploads/`` started before ``older_than`` (epoch
        seconds) and delete such temp objects: what a killed replica left. Returns how many."""
        prefix = self.config.key("_uploads/")
        removed = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.config.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < older_than:
                    with contextlib.suppress(ClientError):
                        await self.client.abort_multipart_upload(
                            Bucket=self.config.bucket, Key=upload["Key"],
                            UploadId=upload["UploadId"])
                        removed += 1
        async for rel, _, mtime in self._list("_uploads/"):
            if mtime < older_than:
                await self._drop(f"_uploads/{rel}")
                removed += 1
        return removed
