"""Build and push test images to any V2 registry through the real distribution API."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import random
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from yarl import URL

# ---------------------------------------------------------------------------
# Media types
# ---------------------------------------------------------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

#: Accept header value covering every manifest type above.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

Schema = Literal["docker", "oci"]
Platform = tuple[str, str] | tuple[str, str, str]

CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


class RegistryAPIError(RuntimeError):
    """A registry answered a push/pull request with an unexpected status."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form used inside manifests."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform is not None:
            out["platform"] = dict(self.platform)
        return out


@dataclass(frozen=True)
class TarLayer:
    """A gzip-compressed tar layer held in memory, with its diff_id."""

    data: bytes
    diff_id: str

    @property
    def digest(self) -> str:
        """Digest of the compressed bytes."""
        return sha256_digest(self.data)


@dataclass(frozen=True)
class PushedImage:
    """A single-platform image that was pushed."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    config: Descriptor
    config_bytes: bytes
    layers: list[Descriptor]
    platform: Platform

    def descriptor(self, with_platform: bool = True) -> Descriptor:
        """Descriptor of this manifest (with platform, for an index)."""
        return Descriptor(
            self.media_type,
            self.digest,
            len(self.manifest),
            platform_dict(self.platform) if with_platform else None,
        )


@dataclass(frozen=True)
class PushedIndex:
    """A multi-platform index / manifest list that was pushed."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    images: list[PushedImage] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Hashing / serialization helpers
# ---------------------------------------------------------------------------
def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> tuple[str, int]:
    """Digest and size of a file, read in 1 MiB chunks (blocking)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def gzip_file_diff_id(path: Path) -> str:
    """sha256 of the decompressed content of a gzip file (blocking, streaming)."""
    h = hashlib.sha256()
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(d.decompress(chunk))
        h.update(d.flush())
    return "sha256:" + h.hexdigest()


def dumps_manifest(obj: Any) -> bytes:
    """Serialize a manifest deterministically (indent=3, like distribution)."""
    return json.dumps(obj, indent=3).encode()


def platform_dict(platform: Platform) -> dict[str, str]:
    """``("linux", "arm64", "v8")`` -> ``{"os": ..., "architecture": ..., "variant": ...}``."""
    out = {"architecture": platform[1], "os": platform[0]}
    if len(platform) > 2:
        out["variant"] = platform[2]  # type: ignore[misc]
    return out


# ---------------------------------------------------------------------------
# Content generators
# ---------------------------------------------------------------------------
def make_layer_file(path: Path | str, size: int, seed: int = 0) -> tuple[str, int]:
    """Write ``size`` deterministic pseudo-random bytes to ``path``; return (digest, size)."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    remaining = size
    with open(path, "wb") as f:
        while remaining > 0:
            n = min(CHUNK, remaining)
            chunk = rng.randbytes(n)
            h.update(chunk)
            f.write(chunk)
            remaining -= n
    return "sha256:" + h.hexdigest(), size


def make_random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (small blobs)."""
    return random.Random(seed).randbytes(size)


def make_tar_layer(files: dict[str, bytes] | None = None, seed: int = 0) -> TarLayer:
    """Build a small, deterministic, unpackable gzip'd tar layer.

    Default content: ``bin/`` (dir), ``etc/`` (dir), ``hello.txt`` and
    ``etc/layer-<seed>`` so that different seeds give different layers.
    Extra ``files`` (path -> content) are added/override.
    """
    contents: dict[str, bytes] = {
        "hello.txt": f"hello from test layer {seed}\n".encode(),
        f"etc/layer-{seed}": make_random_bytes(256, seed),
    }
    contents.update(files or {})
    dirs = {"bin", "etc"}
    for name in contents:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 0
            tar.addfile(info)
        for name in sorted(contents):
            data = contents[name]
            info = tarfile.TarInfo(name.strip("/"))
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    compressed = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    return TarLayer(compressed, sha256_digest(tar_bytes))


# ---------------------------------------------------------------------------
# Low-level V2 API
# ---------------------------------------------------------------------------
def _base(base: str) -> str:
    return base.rstrip("/")


def _location_url(base: str, location: str, **params: str) -> URL:
    """Resolve a (relative or absolute) Location and append query params verbatim."""
    url = str(URL(_base(base) + "/").join(URL(location, encoded=True)))
    if params:
        sep = "&" if "?" in url else "?"
        url += sep + "&".join(f"{k}={v}" for k, v in params.items())
    return URL(url, encoded=True)


async def _check(resp: aiohttp.ClientResponse, expected: int | tuple[int, ...], what: str) -> None:
    codes = (expected,) if isinstance(expected, int) else expected
    if resp.status not in codes:
        body = await resp.text(errors="replace")
        raise RegistryAPIError(f"{what}: HTTP {resp.status} (expected {codes}): {body[:2000]}")


async def blob_exists(session: aiohttp.ClientSession, base: str, repo: str, digest: str) -> int | None:
    """HEAD a blob; return its Content-Length, or None when absent."""
    async with session.head(f"{_base(base)}/v2/{repo}/blobs/{digest}", allow_redirects=True) as resp:
        if resp.status == 404:
            return None
        await _check(resp, 200, f"HEAD blob {repo}@{digest}")
        return int(resp.headers["Content-Length"])


async def push_blob(
    session: aiohttp.ClientSession,
    base: str,
    repo: str,
    content: Path | bytes,
    *,
    media_type: str = "application/octet-stream",
    chunk_size: int | None = None,
    skip_existing: bool = False,
) -> Descriptor:
    """Upload a blob (file streamed from disk, or bytes) and return its descriptor.

    Monolithic POST + PUT by default; with ``chunk_size`` the data is sent as
    PATCH chunks with Content-Range followed by a closing PUT.
    """
    if isinstance(content, Path):
        digest, size = await asyncio.to_thread(file_digest, content)
    else:
        digest, size = sha256_digest(content), len(content)
    desc = Descriptor(media_type, digest, size)
    if skip_existing and await blob_exists(session, base, repo, digest) == size:
        return desc

    async with session.post(f"{_base(base)}/v2/{repo}/blobs/uploads/") as resp:
        await _check(resp, 202, f"start upload to {repo}")
        location = resp.headers["Location"]

    octet = {"Content-Type": "application/octet-stream"}
    if chunk_size is None:
        url = _location_url(base, location, digest=digest)
        headers = {**octet, "Content-Length": str(size)}
        if isinstance(content, Path):
            with open(content, "rb") as f:  # noqa: ASYNC230 - aiohttp reads it in an executor
                async with session.put(url, data=f, headers=headers) as resp:
                    await _check(resp, 201, f"PUT blob {digest} to {repo}")
        else:
            async with session.put(url, data=content, headers=headers) as resp:
                await _check(resp, 201, f"PUT blob {digest} to {repo}")
        return desc

    offset = 0
    src = open(content, "rb") if isinstance(content, Path) else io.BytesIO(content)  # noqa: SIM115,ASYNC230
    try:
        while offset < size:
            chunk = await asyncio.to_thread(src.read, chunk_size)
            end = offset + len(chunk) - 1
            headers = {**octet, "Content-Range": f"{offset}-{end}", "Content-Length": str(len(chunk))}
            async with session.patch(_location_url(base, location), data=chunk, headers=headers) as resp:
                await _check(resp, 202, f"PATCH blob chunk {offset}-{end} to {repo}")
                location = resp.headers["Location"]
            offset += len(chunk)
    finally:
        src.close()
    url = _location_url(base, location, digest=digest)
    async with session.put(url, data=b"", headers={**octet, "Content-Length": "0"}) as resp:
        await _check(resp, 201, f"closing PUT blob {digest} to {repo}")
    return desc


async def push_manifest(
    session: aiohttp.ClientSession,
    base: str,
    repo: str,
    ref: str,
    body: bytes,
    media_type: str,
) -> str:
    """PUT a manifest under ``ref`` (tag or digest); return its digest."""
    digest = sha256_digest(body)
    async with session.put(
        f"{_base(base)}/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type}
    ) as resp:
        await _check(resp, 201, f"PUT manifest {repo}:{ref}")
        returned = resp.headers.get("Docker-Content-Digest")
    if returned is not None and returned != digest:
        raise RegistryAPIError(f"registry reports digest {returned}, expected {digest}")
    return digest


async def get_manifest(
    session: aiohttp.ClientSession,
    base: str,
    repo: str,
    ref: str,
    accept: str = MANIFEST_ACCEPT,
) -> tuple[bytes, str, str]:
    """GET a manifest; return (body, Content-Type, Docker-Content-Digest or computed digest)."""
    async with session.get(f"{_base(base)}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}) as resp:
        await _check(resp, 200, f"GET manifest {repo}:{ref}")
        body = await resp.read()
        ctype = resp.headers.get("Content-Type", "")
        digest = resp.headers.get("Docker-Content-Digest") or sha256_digest(body)
    return body, ctype, digest


# ---------------------------------------------------------------------------
# Image-level helpers
# ---------------------------------------------------------------------------
async def _layer_info(layer: Path | bytes | TarLayer) -> tuple[Path | bytes, bool, str | None]:
    """Return (content, is_gzip, diff_id-or-None-meaning-use-digest)."""
    if isinstance(layer, TarLayer):
        return layer.data, True, layer.diff_id
    if isinstance(layer, Path):
        with open(layer, "rb") as f:  # noqa: ASYNC230 - two bytes
            magic = f.read(2)
        if magic == _GZIP_MAGIC:
            return layer, True, await asyncio.to_thread(gzip_file_diff_id, layer)
        return layer, False, None
    if layer[:2] == _GZIP_MAGIC:
        try:  # random test bytes begin with the magic once in 65,536 layers
            return layer, True, sha256_digest(gzip.decompress(layer))
        except (OSError, EOFError, zlib.error):
            pass
    return layer, False, None


def build_config(
    platform: Platform,
    diff_ids: Sequence[str],
    *,
    labels: dict[str, str] | None = None,
    created: str = "2024-01-01T00:00:00Z",
) -> bytes:
    """Return a realistic image config JSON (compact, deterministic)."""
    pd = platform_dict(platform)
    config: dict[str, Any] = {
        "architecture": pd["architecture"],
        "os": pd["os"],
        "created": created,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
            "Labels": dict(labels or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": created, "created_by": f"test-harness layer {i}"} for i in range(len(diff_ids))
        ],
    }
    if "variant" in pd:
        config["variant"] = pd["variant"]
    return json.dumps(config, separators=(",", ":"), sort_keys=True).encode()


async def push_image(
    session: aiohttp.ClientSession,
    base: str,
    repo: str,
    tag: str | None,
    layers: Sequence[Path | bytes | TarLayer],
    schema: Schema = "docker",
    platform: Platform = ("linux", "amd64"),
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> PushedImage:
    """Push layers, a config and a manifest; tag it (or push by digest when ``tag`` is None).

    gzip layers (TarLayer, or Path/bytes starting with the gzip magic) get a
    ``tar+gzip`` media type and a real diff_id; anything else is declared as
    an uncompressed tar whose diff_id is its digest.
    """
    if schema == "docker":
        manifest_type, config_type, gz_type, tar_type = (
            DOCKER_MANIFEST,
            DOCKER_CONFIG,
            DOCKER_LAYER_GZIP,
            DOCKER_LAYER_TAR,
        )
    else:
        manifest_type, config_type, gz_type, tar_type = (
            OCI_MANIFEST,
            OCI_CONFIG,
            OCI_LAYER_GZIP,
            OCI_LAYER_TAR,
        )

    layer_descs: list[Descriptor] = []
    diff_ids: list[str] = []
    for layer in layers:
        content, is_gzip, diff_id = await _layer_info(layer)
        desc = await push_blob(session, base, repo, content, media_type=gz_type if is_gzip else tar_type)
        layer_descs.append(desc)
        diff_ids.append(diff_id or desc.digest)

    config_bytes = build_config(platform, diff_ids, labels=labels)
    config_desc = await push_blob(session, base, repo, config_bytes, media_type=config_type)

    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_desc.as_dict(),
        "layers": [d.as_dict() for d in layer_descs],
    }
    if annotations and schema == "oci":
        manifest["annotations"] = dict(annotations)
    body = dumps_manifest(manifest)
    digest = await push_manifest(session, base, repo, tag or sha256_digest(body), body, manifest_type)
    return PushedImage(
        repo=repo,
        tag=tag,
        digest=digest,
        manifest=body,
        media_type=manifest_type,
        config=config_desc,
        config_bytes=config_bytes,
        layers=layer_descs,
        platform=platform,
    )


async def push_index(
    session: aiohttp.ClientSession,
    base: str,
    repo: str,
    tag: str | None,
    images: Sequence[PushedImage],
    schema: Schema = "oci",
) -> PushedIndex:
    """Push an OCI image index (``oci``) or Docker manifest list (``docker``) over ``images``.

    The images must already be in ``repo`` (e.g. pushed with ``tag=None``).
    """
    media_type = OCI_INDEX if schema == "oci" else DOCKER_MANIFEST_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [img.descriptor().as_dict() for img in images],
    }
    body = dumps_manifest(index)
    digest = await push_manifest(session, base, repo, tag or sha256_digest(body), body, media_type)
    return PushedIndex(
        repo=repo, tag=tag, digest=digest, manifest=body, media_type=media_type, images=list(images)
    )
