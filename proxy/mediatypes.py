"""Manifest media types and ``Accept`` negotiation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from proxy.bounded import BoundedDict
from proxy.errors import RegistryError
from proxy.reference import Digest
from proxy.untrusted import loads_json

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

IMAGE_MANIFESTS = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEXES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
#: What a push may be stored and served as (``Content-Type``, or the body's ``mediaType``
#: when the header is generic): a pusher must not pick ``text/html`` for a browser to
#: render from the registry's origin. OCI 1.1 artifacts are image manifests with an
#: ``artifactType``, so they pass; ``application/vnd.oci.artifact.manifest.v1+json`` of
#: the 1.1 release candidates was dropped from the final spec (and ORAS 1.0 stopped
#: sending it), so it is refused like any other non-manifest type.
PUSHABLE = IMAGE_MANIFESTS | INDEXES
#: What we ask upstreams for: every type we can store and serve, so we never trigger a
#: conversion upstream and the digest a client sees is the upstream's own.
ALL_MANIFESTS = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
UPSTREAM_ACCEPT = ", ".join(ALL_MANIFESTS)


#: Parsed ``Accept`` headers: a client sends the same ones on every request.
_ACCEPT_MEMO: BoundedDict[tuple[str, ...], frozenset[str]] = BoundedDict(1000)


def parse_accept(values: Iterable[str]) -> frozenset[str]:
    """Media types named in one or more ``Accept`` header lines (parameters dropped)."""
    key = tuple(values)
    found = _ACCEPT_MEMO.get(key)
    if found is not None:
        return found
    types = frozenset(
        media for value in key for item in value.split(",")
        if (media := item.split(";", 1)[0].strip().lower())
    )
    if sum(map(len, key)) <= 4096:  # bounded: odd or huge headers do not pile up
        _ACCEPT_MEMO[key] = types
    return types


def accepts(accepted: AbstractSet[str], media_type: str) -> bool:
    """Whether a client that sent ``accepted`` takes ``media_type``.

    No ``Accept`` at all, or a wildcard, means anything goes (containerd always adds
    ``*/*``; skopeo and crane send explicit lists).
    """
    if not accepted or "*/*" in accepted or "application/*" in accepted:
        return True
    return media_type.lower() in accepted


#: Content types that say nothing about a manifest: look at its body instead.
GENERIC_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})


def sniff_media_type(data: bytes) -> str | None:
    """The ``mediaType`` a manifest declares about itself, if any."""
    try:
        doc = loads_json(data)
    except ValueError:
        return None
    if isinstance(doc, dict):
        value = doc.get("mediaType")
        if isinstance(value, str):
            return value
        if "manifests" in doc:
            return OCI_INDEX
        if "config" in doc and "layers" in doc:
            return OCI_MANIFEST
    return None


def platform_child(index: bytes, os_name: str, arch: str) -> str | None:
    """Digest of the ``os/arch`` entry of an index or manifest list (for old clients)."""
    try:
        doc = loads_json(index)
        for entry in doc.get("manifests", []):
            plat = entry.get("platform") or {}
            if plat.get("os") == os_name and plat.get("architecture") == arch:
                digest = entry.get("digest")
                return digest if isinstance(digest, str) else None
    except (ValueError, AttributeError, TypeError):
        return None
    return None


def references(doc: object, *, distributable: bool = False) -> tuple[list[Digest], list[Digest]]:
    """(child manifests, blobs) a parsed manifest or index points at; malformed descriptors
    are skipped (validation of pushed manifests is stricter, elsewhere). ``distributable``:
    also skip foreign layers (descriptors with ``urls``), which a registry does not hold."""
    if not isinstance(doc, dict):
        return [], []

    def digests(entries: Iterable[object]) -> list[Digest]:
        out = []
        for entry in entries:
            if distributable and isinstance(entry, dict) and entry.get("urls"):
                continue
            if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
                with contextlib.suppress(RegistryError):
                    out.append(Digest.parse(entry["digest"]))
        return out

    manifests = digests(doc.get("manifests") or [])
    blobs = digests([doc.get("config"), *(doc.get("layers") or []), *(doc.get("blobs") or [])])
    return manifests, blobs
