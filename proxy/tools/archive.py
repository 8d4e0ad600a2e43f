"""``regproxy export`` and ``regproxy import``: image tarballs in and out of the proxy.

Export writes one archive that is both a ``docker save`` tarball (``manifest.json`` with
Config/RepoTags/Layers) and an OCI image layout (``oci-layout``, ``index.json``), sharing
one copy of every blob under ``blobs/sha256/`` as modern ``docker save`` does. So
``docker load``, ``podman load``, ``skopeo copy docker-archive:`` and ``oci-archive:`` all
take it. Blobs stream from the proxy straight into the tar (headers written with the size
known from the descriptor); nothing is held in memory.

Import reads either layout (OCI when there is an ``index.json``, it keeps the digests;
``manifest.json`` otherwise, building a Docker schema 2 manifest over the uncompressed
layers) and pushes into hosted repositories through the V2 upload API, hashing each blob
while it streams and completing the upload only when the digest matches.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import os
import posixpath
import re
import tarfile
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from yarl import URL

from proxy.mediatypes import DOCKER_MANIFEST, OCI_INDEX
from proxy.reference import NAME_RE, TAG_RE
from proxy.tools.blobfetch import fetch_blob
from proxy.tools.client import (
    CHUNK,
    DEFAULT_PROXY,
    Descriptor,
    ImageRef,
    Manifest,
    Platform,
    ProxyTLS,
    RegistryClient,
    ToolError,
    describe,
    digest_of,
    resolve,
    with_retries,
)
from proxy.tools.progress import Progress, make_progress, row_label
from proxy.units import human_rate, human_size

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def blob_path(digest: str) -> str:
    algorithm, hex_ = digest.split(":", 1)
    return f"blobs/{algorithm}/{hex_}"


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
class TarWriter:
    """Appends members to an uncompressed tar file; bodies may be streamed when their size is
    known up front, and a member can be rolled back (a failed download is retried in place)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.offset = 0

    async def _write(self, data: bytes) -> None:
        await asyncio.to_thread(self.fh.write, data)
        self.offset += len(data)

    @staticmethod
    def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size if kind == tarfile.REGTYPE else 0
        info.type = kind
        info.mode = 0o644 if kind == tarfile.REGTYPE else 0o755
        info.mtime = 0
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    async def add_dir(self, name: str) -> None:
        await self._write(self._header(name.rstrip("/") + "/", 0, tarfile.DIRTYPE))

    async def add_bytes(self, name: str, data: bytes) -> None:
        await self._write(self._header(name, len(data)) + data + self._padding(len(data)))

    async def add_stream(self, name: str, size: int, chunks: AsyncIterator[bytes]) -> None:
        """A member of exactly ``size`` bytes from ``chunks`` (more or fewer is an error)."""
        await self._write(self._header(name, size))
        written = 0
        async for chunk in chunks:
            written += len(chunk)
            if written > size:
                raise ToolError(f"{name}: more than the {size} bytes announced", retryable=True)
            await self._write(chunk)
        if written != size:
            raise ToolError(f"{name}: got {written} of {size} bytes", retryable=True)
        await self._write(self._padding(size))

    @staticmethod
    def _padding(size: int) -> bytes:
        return b"\0" * (-size % _BLOCK)

    async def rollback(self, offset: int) -> None:
        def cut() -> None:
            self.fh.seek(offset)
            self.fh.truncate()
        await asyncio.to_thread(cut)
        self.offset = offset

    async def finish(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole record."""
        end = self.offset + 2 * _BLOCK
        await self._write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))


@dataclass
class ExportReport:
    output: Path
    images: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"exported {len(self.images)} image(s), {self.blobs} blob(s), {human_size(self.bytes)} "
                f"to {self.output} in {self.seconds:.1f}s ({human_rate(self.bytes, self.seconds)})")


@dataclass
class _Exported:
    manifest: Manifest
    platform: dict[str, Any] | None
    refs: list[ImageRef] = field(default_factory=list)


async def _stream_blob(client: RegistryClient, writer: TarWriter, name: str, desc: Descriptor,
                       progress: Progress, overall: Any, retries: int, image: str) -> None:
    """One blob into its tar member; a failed attempt's partial member is cut off again."""
    start = writer.offset

    async def restart() -> None:
        if writer.offset != start:
            await writer.rollback(start)

    async def sink(chunks: AsyncIterator[bytes]) -> None:
        await writer.add_stream(blob_path(desc.digest), desc.size, chunks)

    await fetch_blob(client, name, desc, progress, overall, retries=retries, image=image,
                     sink=sink, restart=restart)


async def export_images(
    images: Sequence[str],
    output: Path | str,
    proxy: str = DEFAULT_PROXY,
    *,
    platform: str | None = None,
    progress: bool | None = False,
    username: str | None = None,
    password: str | None = None,
    retries: int = 3,
    tls: ProxyTLS | None = None,
) -> ExportReport:
    """Write ``images`` (one platform each, default ``linux/amd64``) to the tarball ``output``,
    fetched through the proxy. The file appears only when complete."""
    started = time.monotonic()
    output = Path(output)
    report = ExportReport(output)
    wanted = [Platform.parse(platform or "linux/amd64")]
    refs = [ImageRef.parse(text) for text in images]
    if not refs:
        raise ToolError("no images to export")
    bar = make_progress(progress)
    async with RegistryClient.connect(proxy, username=username, password=password,
                                      tls=tls) as client:
        exported: dict[str, _Exported] = {}
        blobs: dict[str, tuple[str, Descriptor, str]] = {}  #: digest -> (name, blob, image)
        for ref in refs:
            try:
                image = await resolve(client, ref, wanted, retries=retries)
            except Exception as exc:
                raise ToolError(f"{ref}: {describe(exc)}") from exc
            manifest, plat = image.images[0]
            entry = exported.setdefault(manifest.digest, _Exported(manifest, plat))
            entry.refs.append(ref)
            for desc in manifest.blobs():
                blobs.setdefault(desc.digest, (image.name, desc, str(ref)))
            report.images.append(str(ref))

        partial = output.with_name(output.name + ".part")
        fh = await asyncio.to_thread(open, partial, "wb")
        try:
            writer = TarWriter(fh)
            with bar:
                overall = bar.overall(f"export {len(refs)} image(s)",
                                      sum(d.size for _, d, _ in blobs.values()))
                await writer.add_dir("blobs")
                for algorithm in sorted({d.algorithm for _, d, _ in blobs.values()} | {"sha256"}):
                    await writer.add_dir(f"blobs/{algorithm}")
                for name, desc, label in blobs.values():
                    await _stream_blob(client, writer, name, desc, bar, overall, retries, label)
                    report.blobs += 1
                    report.bytes += desc.size
            for entry in exported.values():
                await writer.add_bytes(blob_path(entry.manifest.digest), entry.manifest.body)
            await writer.add_bytes("manifest.json", _docker_manifest(exported.values()))
            await writer.add_bytes("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            await writer.add_bytes("index.json", _oci_index(exported.values()))
            await writer.finish()
            await asyncio.to_thread(fh.flush)
            await asyncio.to_thread(os.fsync, fh.fileno())
        except BaseException:
            fh.close()
            partial.unlink(missing_ok=True)
            raise
        fh.close()
        partial.replace(output)
    report.seconds = time.monotonic() - started
    return report


def _docker_manifest(entries: Any) -> bytes:
    doc = []
    for entry in entries:
        tags = [f"{r.familiar_name}:{r.tag}" for r in entry.refs if r.tag]
        doc.append({
            "Config": blob_path(entry.manifest.config.digest),
            "RepoTags": list(dict.fromkeys(tags)),
            "Layers": [blob_path(d.digest) for d in entry.manifest.layers],
        })
    return json.dumps(doc).encode()


def _oci_index(entries: Any) -> bytes:
    manifests = []
    for entry in entries:
        seen = set()
        for ref in entry.refs:
            name = f"{ref.full_name}:{ref.tag}" if ref.tag else f"{ref.full_name}@{entry.manifest.digest}"
            if name in seen:
                continue
            seen.add(name)
            annotations = {ANNOTATION_IMAGE_NAME: name}
            if ref.tag:
                annotations[ANNOTATION_REF_NAME] = ref.tag
            desc = entry.manifest.descriptor(entry.platform)
            manifests.append({**desc.as_dict(), "annotations": annotations})
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """A regular file in the archive: where its bytes start and how many there are."""

    name: str
    offset: int
    size: int


def _norm(name: str) -> str:
    return posixpath.normpath(name).lstrip("/").removeprefix("./")


def index_archive(path: Path) -> dict[str, Member]:
    """Regular files of an uncompressed tar by normalized name, links resolved (blocking)."""
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the with below
    except tarfile.ReadError:
        raise ToolError(f"{path}: not an uncompressed tar archive (gunzip a .tar.gz first)") from None
    except OSError as exc:
        raise ToolError(f"{path}: {exc.strerror or exc}") from None
    members: dict[str, Member] = {}
    links: dict[str, str] = {}
    with tar:
        for info in tar:
            name = _norm(info.name)
            if info.isreg():
                members[name] = Member(name, info.offset_data, info.size)
            elif info.issym():
                links[name] = _norm(posixpath.join(posixpath.dirname(name), info.linkname))
            elif info.islnk():
                links[name] = _norm(info.linkname)
    for name, target in links.items():
        for _ in range(16):
            if target in members:
                members[name] = members[target]
                break
            if target not in links:
                break
            target = links[target]
    return members


class _Archive:
    """Reads members of an indexed tar file without blocking the event loop."""

    def __init__(self, path: Path, members: dict[str, Member]) -> None:
        self.path = path
        self.members = members

    def member(self, name: str) -> Member:
        member = self.members.get(_norm(name))
        if member is None:
            raise ToolError(f"{self.path}: no {name!r} in the archive")
        return member

    def has(self, name: str) -> bool:
        return _norm(name) in self.members

    async def read(self, name: str, limit: int = 64 << 20) -> bytes:
        member = self.member(name)
        if member.size > limit:
            raise ToolError(f"{name}: {member.size} bytes is too large for a metadata file")

        def read() -> bytes:
            with open(self.path, "rb") as fh:
                fh.seek(member.offset)
                return fh.read(member.size)
        return await asyncio.to_thread(read)

    async def read_blob(self, desc: Descriptor) -> bytes:
        """A (small) blob, verified against its descriptor."""
        data = await self.read(blob_path(desc.digest))
        if len(data) != desc.size or digest_of(data, desc.algorithm) != desc.digest:
            raise ToolError(f"{blob_path(desc.digest)}: content does not match {desc.digest} "
                            f"({desc.size} bytes)")
        return data

    async def chunks(self, member: Member, consume: Callable[[bytes], None]) -> AsyncIterator[bytes]:
        """The member's bytes in 1 MiB chunks; ``consume`` (hashing) runs in the reader thread."""
        fh = await asyncio.to_thread(open, self.path, "rb")
        try:
            await asyncio.to_thread(fh.seek, member.offset)
            remaining = member.size

            def read(n: int) -> bytes:
                data = fh.read(n)
                consume(data)
                return data
            while remaining > 0:
                data = await asyncio.to_thread(read, min(CHUNK, remaining))
                if not data:
                    raise ToolError(f"{self.path}: {member.name} is truncated")
                remaining -= len(data)
                yield data
        finally:
            fh.close()


@dataclass
class ImportReport:
    images: list[str] = field(default_factory=list)  #: repo:tag (or repo@digest) pushed
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    blobs: int = 0  #: uploaded
    skipped: int = 0  #: already in the repository (or mounted)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (f"imported {len(self.images)} image(s), {self.blobs} blob(s) uploaded "
                f"({human_size(self.bytes)}, {human_rate(self.bytes, self.seconds)}), "
                f"{self.skipped} already present, in {self.seconds:.1f}s")
        if self.failed:
            text += f"; {len(self.failed)} FAILED"
        return text


@dataclass
class _BlobJob:
    """One blob to put into one repository."""

    repo: str
    member: Member
    size: int
    expected: str | None  #: digest it must have, when known before reading it
    diff_id: str | None = None  #: uncompressed digest it must have (docker-save layers)
    digest: str | None = None  #: set once pushed
    media_type: str | None = None  #: set for docker-save layers once sniffed
    error: str | None = None


@dataclass
class _ImportImage:
    label: str
    repo: str
    tags: list[str]  #: tags (or one digest) to put the top manifest under
    jobs: list[_BlobJob] = field(default_factory=list)
    #: builds the manifests to PUT by digest (digest, body, media type), children first
    build: Callable[[], list[tuple[str, bytes, str]]] | None = None


def target_repo(ref: ImageRef, prefix: str) -> str:
    """Hosted repository for an image name: the registry host dropped, ``library/`` of Docker
    Hub official images dropped, ``prefix`` prepended."""
    path = ref.path
    if ref.domain is None or ref.domain == "docker.io":
        path = path.removeprefix("library/")
    repo = f"{prefix}{path}"
    if not NAME_RE.fullmatch(repo):
        raise ToolError(f"{ref}: {repo!r} is not a valid repository name")
    return repo


def _group_names(names: list[str], prefix: str, label: str) -> dict[str, list[str]]:
    """Image names -> {repository: [tags or digest]}."""
    out: dict[str, list[str]] = {}
    for name in names:
        ref = ImageRef.parse(name)
        tags = out.setdefault(target_repo(ref, prefix), [])
        reference = ref.tag or ref.digest
        if reference and reference not in tags:
            tags.append(reference)
    if not out:
        raise ToolError(f"{label}: no image name")
    return out


def _is_tag_only(value: str) -> bool:
    return "/" not in value and TAG_RE.fullmatch(value) is not None


async def _docker_tags(archive: _Archive) -> dict[str, list[str]]:
    """config digest -> RepoTags, from a ``manifest.json`` beside an ``index.json``."""
    if not archive.has("manifest.json"):
        return {}
    try:
        doc = json.loads(await archive.read("manifest.json"))
        out: dict[str, list[str]] = {}
        for entry in doc:
            m = re.search(r"([a-f0-9]{64})(?:\.json)?$", entry.get("Config", ""))
            if m:
                out.setdefault(f"sha256:{m.group(1)}", []).extend(entry.get("RepoTags") or [])
        return out
    except (ValueError, AttributeError, TypeError):
        return {}


async def _plan_oci(archive: _Archive, prefix: str, report: ImportReport) -> list[_ImportImage]:
    try:
        index = Manifest.from_bytes(await archive.read("index.json"), OCI_INDEX)
        entries = index.children()
    except ToolError as exc:
        raise ToolError(f"index.json: {exc}") from None
    docker_tags = await _docker_tags(archive)
    planned: list[_ImportImage] = []
    for n, desc in enumerate(entries):
        label = f"index.json entry {n} ({desc.digest})"
        try:
            top = Manifest.from_bytes(await archive.read_blob(desc), desc.media_type, desc.digest)
            ann = desc.annotations or {}
            ref_name = ann.get(ANNOTATION_REF_NAME)
            if ANNOTATION_IMAGE_NAME in ann:
                names = [ann[ANNOTATION_IMAGE_NAME]]
            elif ref_name and not _is_tag_only(ref_name):
                names = [ref_name]
            else:
                config = None if top.is_index else top.config.digest
                repo_tags = docker_tags.get(config or "", [])
                same_tag = [t for t in repo_tags if ref_name and t.endswith(f":{ref_name}")]
                names = same_tag or repo_tags
                if not names:
                    raise ToolError("no image name (no io.containerd.image.name annotation, "
                                    "no full org.opencontainers.image.ref.name, no RepoTags)")
            label = f"{label} {names[0]}"
            for repo, tags in _group_names(names, prefix, label).items():
                planned.append(await _plan_tree(archive, repo, tags, top, label, report))
        except ToolError as exc:
            report.failed.append((label, str(exc)))
    return planned


async def _plan_tree(archive: _Archive, repo: str, tags: list[str], top: Manifest, label: str,
                     report: ImportReport) -> _ImportImage:
    image = _ImportImage(label, repo, tags)
    manifests: list[tuple[str, bytes, str]] = []
    jobs: dict[str, _BlobJob] = {}

    async def walk(manifest: Manifest, depth: int) -> Manifest:
        if not manifest.is_index:
            for blob in manifest.blobs():
                member = archive.member(blob_path(blob.digest))
                if member.size != blob.size:
                    raise ToolError(f"{blob_path(blob.digest)}: {member.size} bytes, "
                                    f"the manifest says {blob.size}")
                jobs.setdefault(blob.digest, _BlobJob(repo, member, blob.size, blob.digest))
            manifests.append((manifest.digest, manifest.body, manifest.media_type))
            return manifest
        if depth > 2:
            raise ToolError("indexes nested too deeply")
        children = manifest.children()
        present = [c for c in children if archive.has(blob_path(c.digest))]
        if not present:
            raise ToolError(f"index {manifest.digest}: none of its manifests are in the archive")
        if len(present) < len(children):
            if len(present) == 1:
                _warn(report, f"{label}: index {manifest.digest} has only one of its manifests in "
                              "the archive; pushing that manifest in its place")
                child = present[0]
                return await walk(Manifest.from_bytes(await archive.read_blob(child), child.media_type,
                                                      child.digest), depth + 1)
            doc = copy.deepcopy(manifest.doc)
            doc["manifests"] = [c.as_dict() for c in present]
            body = json.dumps(doc, indent=3).encode()
            _warn(report, f"{label}: index {manifest.digest} is partial in the archive; pushing a "
                          f"new index over the {len(present)} manifests present")
            manifest = Manifest.from_bytes(body, manifest.media_type)
            children = present
        for child in children:
            await walk(Manifest.from_bytes(await archive.read_blob(child), child.media_type, child.digest),
                       depth + 1)
        manifests.append((manifest.digest, manifest.body, manifest.media_type))
        return manifest

    final = await walk(top, 0)
    image.tags = [t for t in tags if ":" not in t] or [final.digest]
    image.jobs = list(jobs.values())
    image.build = lambda: list(manifests)
    return image


def _warn(report: ImportReport, message: str) -> None:
    report.warnings.append(message)


_HEX_NAME = re.compile(r"(?:^|/)(?:sha256[:/])?([a-f0-9]{64})(?:\.json|\.tar)?$")


def _digest_in_name(path: str) -> str | None:
    """``blobs/sha256/<hex>`` or ``<hex>.json``: the content digest the name promises."""
    m = _HEX_NAME.search(path)
    return f"sha256:{m.group(1)}" if m and "layer.tar" not in path else None


async def _plan_docker(archive: _Archive, prefix: str, report: ImportReport) -> list[_ImportImage]:
    try:
        doc = json.loads(await archive.read("manifest.json"))
        if not isinstance(doc, list):
            raise ValueError
    except ValueError:
        raise ToolError("manifest.json: expected a JSON list of images") from None
    planned: list[_ImportImage] = []
    for n, entry in enumerate(doc):
        label = f"manifest.json entry {n}"
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                    or not isinstance(entry.get("Layers"), list):
                raise ToolError("expected Config and Layers")
            names = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
            if names:
                label = f"{label} {names[0]}"
            if not names:
                raise ToolError("untagged image (no RepoTags): no repository to push it to")
            config_body = await archive.read(entry["Config"])
            config_digest = digest_of(config_body)
            promised = _digest_in_name(entry["Config"])
            if promised and promised != config_digest:
                raise ToolError(f"{entry['Config']}: content has digest {config_digest}")
            config = json.loads(config_body)
            diff_ids = config.get("rootfs", {}).get("diff_ids", []) if isinstance(config, dict) else None
            if not isinstance(diff_ids, list) or len(diff_ids) != len(entry["Layers"]):
                raise ToolError(f"{entry['Config']}: rootfs.diff_ids does not match the "
                                f"{len(entry['Layers'])} layers")
            for repo, tags in _group_names(names, prefix, label).items():
                planned.append(_plan_docker_image(archive, repo, tags, label, entry["Layers"],
                                                  diff_ids, entry["Config"], config_body,
                                                  config_digest))
        except (ToolError, ValueError, AttributeError) as exc:
            report.failed.append((label, describe(exc) if isinstance(exc, ToolError) else
                                  f"invalid entry: {exc}"))
    return planned


def _plan_docker_image(archive: _Archive, repo: str, tags: list[str], label: str, layers: list[str],
                       diff_ids: list[Any], config_path: str, config_body: bytes,
                       config_digest: str) -> _ImportImage:
    image = _ImportImage(label, repo, [t for t in tags if ":" not in t])
    jobs: list[_BlobJob] = []
    for path, diff_id in zip(layers, diff_ids, strict=True):
        if not isinstance(path, str) or not isinstance(diff_id, str):
            raise ToolError("invalid Layers or diff_ids entry")
        member = archive.member(path)
        jobs.append(_BlobJob(repo, member, member.size, _digest_in_name(path), diff_id=diff_id))
    config_member = archive.member(config_path)
    image.jobs = [_BlobJob(repo, config_member, config_member.size, config_digest), *jobs]

    def build() -> list[tuple[str, bytes, str]]:
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": len(config_body), "digest": config_digest},
            "layers": [{"mediaType": job.media_type or DOCKER_LAYER_TAR, "size": job.size,
                        "digest": job.digest} for job in image.jobs[1:]],
        }
        body = json.dumps(manifest, indent=3).encode()
        return [(digest_of(body), body, DOCKER_MANIFEST)]

    image.build = build
    if not image.tags:
        raise ToolError("no tag to push the image under")
    return image


async def _mount(client: RegistryClient, repo: str, digest: str, source: str) -> bool:
    """Cross-repository mount; ``False`` when the registry started an upload instead."""
    path = f"/v2/{repo}/blobs/uploads/?mount={digest}&from={source}"
    async with client.request("POST", path, repo=repo, push=True,
                              headers={"Content-Length": "0"}) as resp:
        if resp.status == 201:
            return True
        location = resp.headers.get("Location") if resp.status == 202 else None
    if location:
        await client.cancel_upload(repo, client.url("/").join(URL(location, encoded=True)))
    return False


async def _push_blob(client: RegistryClient, archive: _Archive, job: _BlobJob, bar: Progress,
                     overall: Any, pushed: dict[str, tuple[str, str]], report: ImportReport,
                     retries: int) -> None:
    repo, member = job.repo, job.member
    gzipped = False
    if job.diff_id is not None:  # a docker-save layer: plain tar (digest = diff_id) or gzip
        head = bytearray()
        async for chunk in archive.chunks(Member(member.name, member.offset, min(2, member.size)),
                                          lambda _b: None):
            head += chunk
        gzipped = bytes(head) == b"\x1f\x8b"
        job.media_type = DOCKER_LAYER_GZIP if gzipped else DOCKER_LAYER_TAR
        if not gzipped:
            if job.expected is not None and job.expected != job.diff_id:
                raise ToolError(f"{member.name}: named {job.expected} but its diff_id is {job.diff_id}")
            job.expected = job.diff_id
    if job.expected is not None:
        if await client.blob_size(repo, job.expected) == job.size:
            job.digest = job.expected
            report.skipped += 1
            return
        source = pushed.get(member.name)
        if source and source[1] == job.expected and await _mount(client, repo, job.expected, source[0]):
            job.digest = job.expected
            report.skipped += 1
            return
    algorithm = job.expected.split(":", 1)[0] if job.expected else "sha256"
    task = bar.task(row_label(job.repo, job.expected or member.name), job.size)

    async def attempt() -> str:
        bar.rewind(task, overall)
        hasher = hashlib.new(algorithm)
        inflate = zlib.decompressobj(wbits=31) if gzipped else None
        diff = hashlib.sha256()

        def consume(data: bytes) -> None:
            hasher.update(data)
            if inflate is not None:
                diff.update(inflate.decompress(data))

        async def body() -> AsyncIterator[bytes]:
            async for chunk in archive.chunks(member, consume):
                bar.advance(task, len(chunk), overall)
                yield chunk

        location = await client.start_upload(repo)
        try:
            if job.size:
                location = await client.upload_chunk(repo, location, body(), job.size)
            digest = f"{algorithm}:{hasher.hexdigest()}"
            if job.expected is not None and digest != job.expected:
                raise ToolError(f"{member.name}: content has digest {digest}, expected {job.expected}")
            if inflate is not None:
                diff.update(inflate.flush())
                if f"sha256:{diff.hexdigest()}" != job.diff_id:
                    raise ToolError(f"{member.name}: uncompressed content has digest "
                                    f"sha256:{diff.hexdigest()}, the config says {job.diff_id}")
            await client.finish_upload(repo, location, digest)
        except BaseException:
            await asyncio.shield(client.cancel_upload(repo, location))
            raise
        return digest

    def on_retry(n: int, exc: BaseException) -> None:
        bar.log(f"retry {n}/{retries} of {member.name} to {repo}: {describe(exc)}")

    try:
        job.digest = await with_retries(attempt, retries=retries, on_retry=on_retry)
    finally:
        bar.done(task)
    pushed.setdefault(member.name, (repo, job.digest))
    report.blobs += 1
    report.bytes += job.size


async def import_archive(
    archive_path: Path | str,
    proxy: str = DEFAULT_PROXY,
    *,
    repo_prefix: str = "",
    jobs: int = 4,
    progress: bool | None = False,
    username: str | None = None,
    password: str | None = None,
    retries: int = 3,
    tls: ProxyTLS | None = None,
) -> ImportReport:
    """Push the images of a ``docker save`` or OCI-layout tarball into hosted repositories of
    the proxy at ``proxy`` (repository = image name without its registry, after
    ``repo_prefix``)."""
    started = time.monotonic()
    report = ImportReport()
    path = Path(archive_path)
    archive = _Archive(path, await asyncio.to_thread(index_archive, path))
    if archive.has("index.json"):
        planned = await _plan_oci(archive, repo_prefix, report)
    elif archive.has("manifest.json"):
        planned = await _plan_docker(archive, repo_prefix, report)
    else:
        raise ToolError(f"{path}: neither an OCI layout (index.json) nor a docker save "
                        "archive (manifest.json)")
    bar = make_progress(progress)
    for message in report.warnings:
        bar.log(message)
    unique: dict[tuple[str, str], _BlobJob] = {}
    for image in planned:
        image.jobs = [unique.setdefault((j.repo, j.member.name), j) for j in image.jobs]
    locks: dict[str, asyncio.Lock] = {}
    pushed: dict[str, tuple[str, str]] = {}
    gate = asyncio.Semaphore(max(1, jobs))

    async with RegistryClient.connect(proxy, username=username, password=password,
                                      connections=max(1, jobs) + 4, tls=tls) as client:
        with bar:
            overall = bar.overall(f"import {len(planned)} image(s)", sum(j.size for j in unique.values()))

            async def run(job: _BlobJob) -> None:
                async with locks.setdefault(job.member.name, asyncio.Lock()), gate:
                    try:
                        await _push_blob(client, archive, job, bar, overall, pushed, report, retries)
                    except Exception as exc:
                        job.error = describe(exc)
                        bar.log(f"{job.repo}: {job.member.name}: {job.error}")

            await asyncio.gather(*(run(j) for j in unique.values()))

        for image in planned:
            errors = [j.error for j in image.jobs if j.error]
            if errors:
                report.failed.append((image.label, f"{len(errors)} blob(s) failed: {errors[0]}"))
                continue
            try:
                await _push_manifests(client, image, report, retries)
            except Exception as exc:
                report.failed.append((image.label, describe(exc)))
    report.seconds = time.monotonic() - started
    return report


async def _push_manifests(client: RegistryClient, image: _ImportImage, report: ImportReport,
                          retries: int) -> None:
    assert image.build is not None
    manifests = image.build()
    for reference, body, media_type in manifests:
        await with_retries(functools.partial(client.put_manifest, image.repo, reference, body,
                                             media_type), retries=retries)
    _, body, media_type = manifests[-1]
    for tag in image.tags:
        if ":" in tag:  # a digest reference: pushed above
            report.images.append(f"{image.repo}@{tag}")
            continue
        await with_retries(functools.partial(client.put_manifest, image.repo, tag, body,
                                             media_type), retries=retries)
        report.images.append(f"{image.repo}:{tag}")
