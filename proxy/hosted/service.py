"""Reads and writes of hosted repositories, backed by the store alone.

Every object is verified before it becomes visible: uploads by their digest, manifests by
their digest and by the existence of everything they reference in the same repository.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from proxy.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RegistryError,
    TooManyRequests,
    Unsupported,
)
from proxy.mediatypes import (
    GENERIC_TYPES,
    INDEXES,
    PUSHABLE,
    references,
    sniff_media_type,
)
from proxy.reference import Digest
from proxy.results import CacheOutcome, ManifestResult, StoredBlob, paginate
from proxy.routing import Route
from proxy.singleflight import KeyedLocks
from proxy.storage import Store, Upload, UploadStore
from proxy.storage.referrers import stored_referrers
from proxy.storage.space import FreeSpace
from proxy.untrusted import loads_json, parse_digits

#: Reads a request body chunk by chunk (``b""`` at the end).
ChunkSource = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """Caps on open upload sessions (``[hosted]`` ``max_uploads_per_*``; 0: no cap), so a
    pusher cannot hold unlimited sessions until ``upload_max_age`` purges them."""

    per_repository: int = 0
    per_owner: int = 0  #: per signed-in user, or per client address without one


class Hosted:
    """The private-registry service for repositories matched by ``[hosted]`` patterns."""

    def __init__(self, store: Store, uploads: UploadStore, *, max_manifest_size: int,
                 delete_enabled: bool, upload_max_age: float = 86400.0,
                 limits: UploadLimits = UploadLimits(), space: FreeSpace | None = None) -> None:
        self.store = store
        self.uploads = uploads
        self.upload_max_age = upload_max_age
        self.max_manifest_size = max_manifest_size
        self.delete_enabled = delete_enabled
        self.limits = limits
        self.space = space
        self._locks = KeyedLocks()  #: one append/finish at a time per upload
        self._opening = asyncio.Lock()  #: count-then-create, one at a time in this process

    # -- reads -------------------------------------------------------------------------

    async def manifest(self, route: Route, reference: str | Digest, accepted: AbstractSet[str], *,
                       head: bool) -> ManifestResult:
        """A stored manifest of the repository, by tag or digest, as pushed."""
        digest = reference if isinstance(reference, Digest) else await self.store.get_tag(
            route.key, reference)
        if digest is None or not await self.store.has_manifest_link(route.key, digest):
            raise ManifestUnknown(f"manifest {route.name}:{reference} unknown")
        item = await self.store.get_manifest(digest)
        if item is None:
            raise ManifestUnknown(f"manifest {digest} unknown")
        return ManifestResult.of(item, CacheOutcome.HOSTED)

    async def blob(self, route: Route, digest: Digest, *, head: bool) -> StoredBlob:
        """A blob linked to the repository (pushed, mounted, or a manifest of it)."""
        size = await self.store.blob_size(digest)
        linked = await self.store.has_blob_link(route.key, digest) or await self.store.has_manifest_link(
            route.key, digest)
        if size is None or not linked:
            raise BlobUnknown(f"blob {digest} unknown to {route.name}")
        return StoredBlob(digest, size, CacheOutcome.HOSTED)

    async def tags(self, route: Route, n: int | None, last: str | None) -> tuple[list[str], bool]:
        tags = await self.store.list_tags(route.key)
        if tags is None:
            raise NameUnknown(f"repository {route.name} unknown")
        return paginate(tags, n, last)

    # -- uploads -----------------------------------------------------------------------

    async def start_upload(self, route: Route, owner: str) -> Upload:
        """A new upload session, within the caps and the free-space watermark; ``owner``
        (``user alice``, ``address 10.0.0.7``) is who it counts against."""
        if self.space is not None:
            self.space.check_upload()
        limits = self.limits
        if not limits.per_repository and not limits.per_owner:
            return self.uploads.create(route.key, owner)
        async with self._opening:
            in_repo, by_owner = await asyncio.get_running_loop().run_in_executor(
                None, self.uploads.count_open, route.key, owner)
            if limits.per_repository and in_repo >= limits.per_repository:
                raise TooManyRequests(
                    f"{in_repo} uploads are open in {route.name} (hosted.max_uploads_per_repository"
                    f" = {limits.per_repository}); complete or cancel some first")
            if limits.per_owner and by_owner >= limits.per_owner:
                raise TooManyRequests(
                    f"{owner} has {by_owner} open uploads (hosted.max_uploads_per_user = "
                    f"{limits.per_owner}); complete or cancel some first")
            return self.uploads.create(route.key, owner)

    def has_upload(self, uid: str) -> bool:
        return self.uploads.exists(uid)

    def upload(self, route: Route, uid: str) -> Upload:
        return self.uploads.get(route.key, uid)

    def cancel_upload(self, route: Route, uid: str) -> None:
        self.uploads.delete(self.uploads.get(route.key, uid))

    async def mount(self, route: Route, digest: Digest, source: Route | None) -> bool:
        """Link an existing blob from ``source`` into the repository; False to fall back.
        The blob must be linked in ``source`` (hosted or cached): the pool is shared, and
        a mount must not copy what the source repository does not hold."""
        if source is None or await self.store.blob_size(digest) is None:
            return False
        if not (await self.store.has_blob_link(source.key, digest)
                or await self.store.has_manifest_link(source.key, digest)):
            return False
        await self.store.link_blob(route.key, digest)
        await self.store.touch_blob(digest)
        return True

    async def append(self, route: Route, uid: str, read: ChunkSource,
                     content_range: str | None) -> Upload:
        """Append a chunk; its ``Content-Range`` must start where the upload ends (else 416)."""
        async with self._locks.hold(uid):
            upload = self.uploads.get(route.key, uid)
            if content_range is not None:
                start = _range_start(content_range)
                if start != upload.size:
                    raise RangeNotSatisfiable(
                        f"chunk starts at {start}, upload is at {upload.size}",
                        headers=upload_headers(route.name, upload))
            await self._write(upload, read)
            return self.uploads.get(route.key, uid)

    async def finish(self, route: Route, uid: str, digest: Digest, read: ChunkSource) -> None:
        """Append the last chunk (if any), verify the digest and publish the blob."""
        async with self._locks.hold(uid):
            upload = self.uploads.get(route.key, uid)
            await self._write(upload, read)
            size = await asyncio.get_running_loop().run_in_executor(
                None, self.uploads.verify, upload, digest)
            await self.store.import_file(self.uploads.data_path(upload), digest, size)
            self.uploads.delete(upload)
            await self.store.link_blob(route.key, digest)

    async def monolithic(self, route: Route, digest: Digest, read: ChunkSource, owner: str) -> None:
        """A whole blob in one POST (``?digest=``): a session too, while it streams."""
        upload = await self.start_upload(route, owner)
        try:
            await self.finish(route, upload.uuid, digest, read)
        except BaseException:
            self.uploads.delete(upload)
            raise

    async def _write(self, upload: Upload, read: ChunkSource) -> None:
        fd, hasher = self.uploads.open_append(upload)
        written = 0
        try:
            while chunk := await read():
                if self.space is not None:  # per chunk: one PATCH may stream for hours
                    self.space.check_upload()
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                hasher.update(chunk)
                written += len(chunk)
        except BaseException:
            os.close(fd)
            fd = -1
            self.uploads.truncate(upload, upload.size)  # drop the partial chunk
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    # -- manifests ---------------------------------------------------------------------

    async def put_manifest(self, route: Route, reference: str | Digest, data: bytes,
                           content_type: str) -> tuple[Digest, Digest | None]:
        """Validate and store a manifest; returns its digest and its subject (if any)."""
        if len(data) > self.max_manifest_size:
            raise PayloadTooLarge(f"manifest exceeds {self.max_manifest_size} bytes")
        algorithm = reference.algorithm if isinstance(reference, Digest) else "sha256"
        digest = Digest.of(data, algorithm)
        if isinstance(reference, Digest) and digest != reference:
            raise DigestInvalid(f"manifest digest {digest} does not match {reference}")
        try:
            doc = loads_json(data)
        except ValueError:
            raise ManifestInvalid("manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ManifestInvalid("manifest must be a JSON object")
        media_type = _media_type(doc, content_type, data)
        subject = await self._validate_references(route, doc, media_type)
        await self.store.put_manifest(digest, data, media_type)
        await self.store.link_manifest(route.key, digest)
        for ref in references(doc)[1]:
            await self.store.touch_blob(ref)
        if subject is not None:
            await self.store.add_referrer(route.key, subject, digest)
        if isinstance(reference, str):
            await self.store.set_tag(route.key, reference, digest)
        return digest, subject

    async def _validate_references(self, route: Route, doc: dict[str, Any], media_type: str
                             ) -> Digest | None:
        if doc.get("schemaVersion") != 2:
            raise ManifestInvalid("only schemaVersion 2 manifests are accepted")
        if media_type in INDEXES or "manifests" in doc:
            for desc in _descriptors(doc.get("manifests"), "manifests"):
                if not await self.store.has_manifest_link(route.key, desc):
                    raise ManifestBlobUnknown(f"child manifest {desc} is not in {route.name}")
        else:
            config = doc.get("config")
            refs = [] if config is None else _descriptors([config], "config")
            for layer in doc.get("layers") or []:
                if isinstance(layer, dict) and layer.get("urls"):
                    continue  # foreign layer: not stored here by design
                refs.extend(_descriptors([layer], "layers"))
            for ref in refs:
                if (await self.store.blob_size(ref) is None
                        or not await self.store.has_blob_link(route.key, ref)):
                    raise ManifestBlobUnknown(f"blob {ref} is not in {route.name}",
                                              detail={"digest": str(ref)})
        subject = doc.get("subject")
        if subject is None:
            return None
        (digest,) = _descriptors([subject], "subject")
        return digest

    async def delete_manifest(self, route: Route, reference: str | Digest) -> None:
        """By digest: remove the manifest and its tags; by tag: remove only the tag."""
        if not self.delete_enabled:
            raise Unsupported("deletion is disabled (hosted.delete_enabled = false)")
        if isinstance(reference, str):
            if not await self.store.delete_tag(route.key, reference):
                raise ManifestUnknown(f"tag {reference} unknown in {route.name}")
            return
        item = await self.store.get_manifest(reference)
        if not await self.store.unlink_manifest(route.key, reference):
            raise ManifestUnknown(f"manifest {reference} unknown in {route.name}")
        if item is not None:
            try:
                subject = loads_json(item.data).get("subject")
                (sd,) = _descriptors([subject], "subject") if subject else (None,)
            except (ValueError, AttributeError, RegistryError):
                sd = None
            if sd is not None:
                await self.store.remove_referrer(route.key, sd, reference)

    async def delete_blob(self, route: Route, digest: Digest) -> None:
        """Unlink a blob from the repository; GC reclaims the bytes."""
        if not self.delete_enabled:
            raise Unsupported("deletion is disabled (hosted.delete_enabled = false)")
        if not await self.store.unlink_blob(route.key, digest):
            raise BlobUnknown(f"blob {digest} unknown to {route.name}")

    async def referrers(self, route: Route, subject: Digest) -> list[dict[str, Any]]:
        """The descriptors of the manifests pushed here whose ``subject`` is ``subject``."""
        return await stored_referrers(self.store, route.key, subject)


def _media_type(doc: dict[str, Any], content_type: str, data: bytes) -> str:
    """The type a pushed manifest is stored and served as: one of :data:`PUSHABLE`,
    whether it comes from ``Content-Type`` or (generic header) from the body."""
    declared = doc.get("mediaType")
    header = content_type.split(";")[0].strip().lower()
    if header in GENERIC_TYPES:
        header = ""
    if header and header not in PUSHABLE:
        raise ManifestInvalid(_not_a_manifest(header))
    if isinstance(declared, str) and header and declared != header:
        raise ManifestInvalid(f"mediaType {declared[:100]!r} does not match Content-Type {header!r}")
    media_type = header or (declared if isinstance(declared, str) else None) or sniff_media_type(data)
    if not media_type:
        raise ManifestInvalid("cannot tell the manifest's media type")
    if media_type not in PUSHABLE:
        raise ManifestInvalid(_not_a_manifest(media_type))
    return media_type


def _not_a_manifest(media_type: str) -> str:
    return (f"media type {media_type[:100]!r} is not a manifest type; push an OCI image "
            "manifest or index, or a Docker schema 2 manifest or manifest list")


def _descriptors(items: Any, field: str) -> list[Digest]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ManifestInvalid(f"{field} must be a list of descriptors")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("digest"), str):
            raise ManifestInvalid(f"{field}: every descriptor needs a digest")
        if not isinstance(item.get("size", 0), int):
            raise ManifestInvalid(f"{field}: descriptor size must be an integer")
        try:
            out.append(Digest.parse(item["digest"]))
        except RegistryError:
            raise ManifestInvalid(f"{field}: invalid digest {item['digest'][:100]!r}") from None
    return out


def _range_start(value: str) -> int:
    """Start of a chunk's ``Content-Range: <start>-<end>`` (``bytes`` prefix tolerated)."""
    text = value.strip().removeprefix("bytes").strip().removeprefix("=").strip()
    first, sep, last = text.partition("-")
    start, end = parse_digits(first), parse_digits(last)
    if not sep or start is None or end is None or end < start:
        raise BlobUploadInvalid(f"invalid Content-Range {value[:100]!r}")
    return start


def upload_headers(name: str, upload: Upload) -> dict[str, str]:
    """Location, Range and Docker-Upload-UUID of an upload, as every upload answer has them."""
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload.uuid}",
        "Range": f"0-{max(upload.size - 1, 0)}",
        "Docker-Upload-UUID": upload.uuid,
    }
