"""Blob store on S3-compatible object storage (AWS S3, MinIO, SeaweedFS, ...), via aiobotocore.

A building block for scale-out (issue 7): several proxy hosts share one bucket instead of
one local disk. Layout under ``<prefix>/`` mirrors :mod:`proxy.storage.filesystem`::

    blobs/<alg>/<hex[:2]>/<hex>     bytes of every blob and manifest, stored once
    _uploads/<random>               objects being written (multipart uploads in progress)

The same promise as the filesystem store holds: nothing appears under ``blobs/`` before
its digest and size were checked. Large blobs stream into a multipart upload under a temp
key as they arrive (at most two parts in memory: one filling, one uploading); ``commit``
checks the digest and size, completes the upload, and server-side copies the object to its
final key, which is atomic for readers. A blob that fits in one part skips the multipart
upload and is PUT straight to its final key once verified (a PUT is atomic too).

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
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError

from proxy.config import S3Config
from proxy.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    DigestInvalid,
    RangeNotSatisfiable,
    SizeInvalid,
)
from proxy.reference import Digest
from proxy.storage.base import BlobStat, StoredManifest

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_COPY_SIZE = 5 * 1024 * MiB  # CopyObject's limit
READ_CHUNK = 256 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(exc: ClientError) -> bool:
    """Whether S3 answered "no such object" (servers differ in how they say it)."""
    return _error_code(exc) in _NOT_FOUND or _status(exc) == 404


class S3Range:
    """A ranged GET in progress: an async iterator of chunks that owns the response body.

    Returned already started, so a caller learns of a missing blob or a bad range before
    it sends response headers; ``start``/``end`` (inclusive)/``total`` fill Content-Range.
    Iterating to the end or :meth:`aclose` releases the connection.
    """

    def __init__(self, body: Any, start: int, end: int, total: int) -> None:
        self._body = body
        self.start, self.end, self.total = start, end, total
        self.length = end - start + 1

    def __aiter__(self) -> S3Range:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._body.read(READ_CHUNK)
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return bytes(chunk)

    async def aclose(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            body.close()

    async def __aenter__(self) -> S3Range:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class S3BlobWriter:
    """Streams one blob into a multipart upload under a temp key, hashing as it goes.

    Part uploads overlap with filling the next part (the caller is still reading its
    upstream meanwhile) but never more than one is in flight, so memory stays below two
    parts: :attr:`max_held` records the peak, for tests and metrics.
    """

    def __init__(self, store: S3Store, algorithm: str = "sha256", *, trusted: bool = False
                 ) -> None:
        self._store = store
        self._client = store.client
        self._bucket = store.config.bucket
        self._part_size = store.config.part_size
        self.temp_key = store.config.key(f"_uploads/{secrets.token_hex(16)}")
        self._algorithm = algorithm
        # trusted: the caller hashes and verifies the same bytes itself (a fill's local
        # temp file does), so commit checks only the size
        self._hash = None if trusted else hashlib.new(algorithm)
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
        assert self._hash is not None, "a trusted writer does not hash"
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
        """Verify, then make the blob visible under its content address.

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
            final = self._store.blob_key(expected)
            if self._upload_id is None:  # fits in one part: a verified PUT is atomic
                await self._client.put_object(
                    Bucket=self._bucket, Key=final, Body=self._buf, ContentLength=len(self._buf),
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
                Bucket=self._bucket, Key=final,
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


class S3Store:
    """Content-addressed blobs in one bucket; one aiobotocore client per store.

    Use as ``async with S3Store(config) as store:`` so the client's connection pool
    is opened once and closed on shutdown.
    """

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
            raise RuntimeError("S3Store used outside 'async with'")
        return self._client

    async def __aenter__(self) -> S3Store:
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
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def blob_key(self, digest: Digest) -> str:
        return self.config.key(self._blob_rel(digest))

    @staticmethod
    def _blob_rel(digest: Digest) -> str:
        return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    async def blob_size(self, digest: Digest) -> int | None:
        """Size of a stored blob (a HEAD), or ``None`` when absent."""
        head = await self._head(self._blob_rel(digest))
        return None if head is None else int(head["ContentLength"])

    async def open_writer(self, digest: Digest | None = None) -> S3BlobWriter:
        """A writer for a new blob (``digest``, when known, only picks the hash algorithm)."""
        return S3BlobWriter(self, digest.algorithm if digest is not None else "sha256")

    async def put_small(self, digest: Digest, data: bytes) -> None:
        """Store a small object (a manifest) after checking its digest; one atomic PUT."""
        if Digest.of(data, digest.algorithm) != digest:
            raise DigestInvalid(f"content digest does not match {digest}")
        if await self.blob_size(digest) == len(data):
            return
        await self.client.put_object(
            Bucket=self.config.bucket, Key=self.blob_key(digest), Body=data, ContentLength=len(data),
        )

    async def get_range(self, digest: Digest, start: int = 0, end: int | None = None) -> S3Range:
        """A ranged GET of bytes ``start..end`` (inclusive, like HTTP; ``None``: to the end).

        BLOB_UNKNOWN when absent, RANGE_NOT_SATISFIABLE when ``start`` is past the end.
        """
        if start < 0 or (end is not None and end < start):
            raise RangeNotSatisfiable(f"bad range {start}-{end}")
        rng = f"bytes={start}-" if end is None else f"bytes={start}-{end}"
        try:
            resp = await self.client.get_object(Bucket=self.config.bucket, Key=self.blob_key(digest),
                                                Range=rng)
        except ClientError as exc:
            if _missing(exc):
                raise BlobUnknown(f"blob {digest} unknown") from exc
            if _error_code(exc) == "InvalidRange" or _status(exc) == 416:
                raise RangeNotSatisfiable(f"range {start}-{end} not satisfiable") from exc
            raise
        length = int(resp["ContentLength"])
        content_range = resp.get("ContentRange")  # "bytes 0-99/1234"; absent for a full reply
        total = int(content_range.rsplit("/", 1)[1]) if content_range else length
        first = int(content_range.split()[1].split("-")[0]) if content_range else 0
        return S3Range(resp["Body"], first, first + length - 1, total)

    async def presigned_url(self, digest: Digest, expires: int = 300) -> str:
        """A URL anyone can GET for ``expires`` seconds, so clients fetch blob bytes straight
        from the object store instead of through the proxy."""
        url: str = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": self.blob_key(digest)},
            ExpiresIn=expires,
        )
        return url

    async def delete(self, digest: Digest) -> None:
        """Remove a blob (GC); deleting an absent one is not an error."""
        await self.client.delete_object(Bucket=self.config.bucket, Key=self.blob_key(digest))

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

    # -- small objects -----------------------------------------------------------------

    async def _get(self, key: str) -> tuple[bytes, float] | None:
        """An object's bytes and last-modified time (epoch seconds), ``None`` if absent."""
        try:
            resp = await self.client.get_object(Bucket=self.config.bucket, Key=self.config.key(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        async with resp["Body"] as body:
            data = await body.read()
        return bytes(data), resp["LastModified"].timestamp()

    async def _put(self, key: str, data: bytes = b"") -> None:
        await self.client.put_object(Bucket=self.config.bucket, Key=self.config.key(key),
                                     Body=data, ContentLength=len(data))

    async def _exists(self, key: str) -> bool:
        return await self._head(key) is not None

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

    async def _mtime(self, key: str) -> float | None:
        head = await self._head(key)
        return None if head is None else float(head["LastModified"].timestamp())

    async def _delete(self, key: str) -> bool:
        """Delete an object; True if it existed (S3 does not tell, so ask first)."""
        if not await self._exists(key):
            return False
        await self._drop(key)
        return True

    async def _drop(self, key: str) -> None:
        """Delete an object whether or not it exists (one request)."""
        await self.client.delete_object(Bucket=self.config.bucket, Key=self.config.key(key))

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

    # -- the Store protocol: objects -----------------------------------------------------

    def local_path(self, digest: Digest) -> Path | None:
        return None

    async def check(self) -> str | None:
        try:
            async with asyncio.timeout(3):
                await self.client.head_bucket(Bucket=self.config.bucket)
        except Exception as exc:
            return f"bucket {self.config.bucket}: {type(exc).__name__}"
        return None

    async def open_blob(self, digest: Digest, start: int = 0, end: int | None = None
                        ) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        async with await self.get_range(digest, start, None if end is None else end - 1) as body:
            async for chunk in body:
                yield chunk

    async def redirect_url(self, digest: Digest) -> str | None:
        return await self.presigned_url(digest) if self.config.redirect else None

    def fill_sink(self, digest: Digest) -> S3BlobWriter:
        return S3BlobWriter(self, digest.algorithm, trusted=True)

    async def import_file(self, path: Path, digest: Digest, size: int) -> None:
        if await self.blob_size(digest) == size:
            await self.touch_blob(digest)
            return
        writer = S3BlobWriter(self, digest.algorithm)
        loop = asyncio.get_running_loop()
        with open(path, "rb") as fh:  # noqa: ASYNC230 (reads go to a thread below)
            try:
                while chunk := await loop.run_in_executor(None, fh.read, self.config.part_size):
                    await writer.write(chunk)
                await writer.commit(digest, size)
            except BaseException:
                await writer.abort()
                raise

    def _access_key(self, digest: Digest) -> str:
        return f"access/{digest.algorithm}/{digest.hex}"

    async def touch_blob(self, digest: Digest) -> None:
        """Record a use as a tiny marker object (its LastModified), in the background: S3
        cannot change an object's mtime, and a hit must not wait for a PUT."""
        task = asyncio.create_task(self._put(self._access_key(digest)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _last_used(self, digest: Digest) -> float | None:
        stored = await self._mtime(self._blob_rel(digest))
        if stored is None:
            return None
        return max(stored, await self._mtime(self._access_key(digest)) or 0.0)

    async def delete_blob(self, digest: Digest, *, older_than: float | None = None) -> bool:
        if older_than is not None:
            used = await self._last_used(digest)
            if used is None or used >= older_than:
                return False
        elif await self.blob_size(digest) is None:
            return False
        await self._drop(self._media_type_key(digest))
        await self.delete(digest)
        await self._drop(self._access_key(digest))
        return True

    async def blob_stats(self) -> AsyncIterator[BlobStat]:
        used: dict[str, float] = {}
        async for rel, _, mtime in self._list("access/"):
            used[rel] = mtime
        async for rel, size, mtime in self._list("blobs/"):
            alg, _, rest = rel.partition("/")
            hexpart = rest.rpartition("/")[2]
            try:
                digest = Digest(alg, hexpart)
            except Exception:
                continue
            yield BlobStat(digest, size, max(mtime, used.get(f"{alg}/{hexpart}", 0.0)))

    # -- manifests -----------------------------------------------------------------------

    def _media_type_key(self, digest: Digest) -> str:
        return f"manifests/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """The bytes first (verified), then the media type, which makes it visible."""
        await self.put_small(digest, data)
        await self._put(self._media_type_key(digest), media_type.encode())

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        media = await self._get(self._media_type_key(digest))
        if media is None:
            return None
        try:
            body = await self.get_range(digest)
        except BlobUnknown:
            return None
        async with body:
            data = b"".join([chunk async for chunk in body])
        return StoredManifest(digest, media[0].decode(), data)

    async def has_manifest(self, digest: Digest) -> bool:
        return await self._exists(self._media_type_key(digest))

    # -- repositories --------------------------------------------------------------------

    @staticmethod
    def _link(name: str, kind: str, digest: Digest) -> str:
        return f"repositories/{name}/{kind}/{digest.algorithm}/{digest.hex}"

    async def link_manifest(self, name: str, digest: Digest) -> None:
        await self._put(self._link(name, "_manifests", digest))

    async def has_manifest_link(self, name: str, digest: Digest) -> bool:
        return await self._exists(self._link(name, "_manifests", digest))

    async def unlink_manifest(self, name: str, digest: Digest) -> bool:
        if not await self._delete(self._link(name, "_manifests", digest)):
            return False
        for tag in await self.list_tags(name) or []:
            if await self.get_tag(name, tag) == digest:
                await self.delete_tag(name, tag)
        return True

    async def _list_links(self, name: str, kind: str) -> list[Digest]:
        out = []
        async for rel, _, _ in self._list(f"repositories/{name}/{kind}/"):
            alg, _, hexpart = rel.partition("/")
            with contextlib.suppress(Exception):
                out.append(Digest(alg, hexpart))
        return out

    async def list_manifest_links(self, name: str) -> list[Digest]:
        return await self._list_links(name, "_manifests")

    async def link_blob(self, name: str, digest: Digest) -> None:
        await self._put(self._link(name, "_layers", digest))

    async def has_blob_link(self, name: str, digest: Digest) -> bool:
        return await self._exists(self._link(name, "_layers", digest))

    async def unlink_blob(self, name: str, digest: Digest) -> bool:
        return await self._delete(self._link(name, "_layers", digest))

    async def list_blob_links(self, name: str) -> list[Digest]:
        return await self._list_links(name, "_layers")

    @staticmethod
    def _referrer(name: str, subject: Digest, digest: Digest) -> str:
        return (f"repositories/{name}/_referrers/{subject.algorithm}/{subject.hex}/"
                f"{digest.algorithm}-{digest.hex}")

    async def add_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        await self._put(self._referrer(name, subject, digest))

    async def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        await self._drop(self._referrer(name, subject, digest))

    async def list_referrers(self, name: str, subject: Digest) -> list[Digest]:
        out = []
        async for rel, _, _ in self._list(
                f"repositories/{name}/_referrers/{subject.algorithm}/{subject.hex}/"):
            alg, _, hexpart = rel.partition("-")
            with contextlib.suppress(Exception):
                out.append(Digest(alg, hexpart))
        return sorted(out, key=str)

    async def set_tag(self, name: str, tag: str, digest: Digest, *, confirmed: bool = False
                      ) -> None:
        """Rewriting the object refreshes its LastModified: the time of the last upstream
        confirmation, which replicas share as the tag's freshness."""
        key = f"repositories/{name}/_tags/{tag}"
        if not confirmed:
            current = await self._get(key)
            if current is not None and current[0].decode() == str(digest):
                return
        await self._put(key, str(digest).encode())

    async def tag_with_age(self, name: str, tag: str) -> tuple[Digest | None, float]:
        got = await self._get(f"repositories/{name}/_tags/{tag}")
        if got is None:
            return None, 0.0
        try:
            return Digest.parse(got[0].decode().strip()), max(0.0, time.time() - got[1])
        except Exception:  # a damaged link is treated as absent, never as a 500
            return None, 0.0

    async def get_tag(self, name: str, tag: str) -> Digest | None:
        return (await self.tag_with_age(name, tag))[0]

    async def delete_tag(self, name: str, tag: str) -> bool:
        return await self._delete(f"repositories/{name}/_tags/{tag}")

    async def list_tags(self, name: str) -> list[str] | None:
        tags = [rel async for rel, _, _ in self._list(f"repositories/{name}/_tags/")]
        if tags:
            return sorted(tags)
        async for rel, _, _ in self._list(f"repositories/{name}/", delimiter=True):
            if rel in ("_manifests", "_layers"):
                return []
        return None

    async def rename_repository(self, old: str, new: str) -> None:
        """Copy every tag and link object of ``old`` to ``new`` (S3 has no rename), then
        delete the originals; objects of nested repositories stay."""
        async for rel, _, _ in self._list(f"repositories/{old}/"):
            if not rel.startswith("_"):
                continue  # rel begins with another component: a nested repository's
            src, dst = f"repositories/{old}/{rel}", f"repositories/{new}/{rel}"
            if not await self._exists(dst):
                await self.client.copy_object(
                    Bucket=self.config.bucket, Key=self.config.key(dst),
                    CopySource={"Bucket": self.config.bucket, "Key": self.config.key(src)})
            await self._drop(src)

    async def layout_version(self) -> int | None:
        got = await self._get("layout")
        try:
            return None if got is None else int(got[0].decode().strip())
        except ValueError:
            return None

    async def set_layout_version(self, version: int) -> None:
        await self._put("layout", f"{version}\n".encode())

    async def purge_marker(self) -> str | None:
        got = await self._get("purged")
        return None if got is None else got[0].decode(errors="replace").strip()

    async def mark_purge(self) -> None:
        await self._put("purged", f"{secrets.token_hex(8)}\n".encode())

    async def list_repositories(self) -> list[str]:
        names = set()
        async for rel, _, _ in self._list("repositories/"):
            for marker in ("/_tags/", "/_manifests/", "/_layers/"):
                if marker in rel:
                    names.add(rel.split(marker, 1)[0])
                    break
        return sorted(names)
