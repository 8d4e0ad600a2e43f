"""Tag names of artifacts attached to a manifest, and referrers lists.

Two conventions name a digest's attachments by tag, for registries without the OCI 1.1
referrers API:

* the distribution spec's *referrers tag schema*: ``<alg>-<encoded>`` (``sha256-<hex>``),
  whose manifest is an image index listing the referrers (the spec's fallback when
  ``/v2/<name>/referrers/<digest>`` answers 404; cosign 3 pushes its bundles there too);
* cosign's tags: ``sha256-<hex>.sig`` (signatures), ``.att`` (attestations), ``.sbom``.

Both are tags of the subject's own repository. Everything here is pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from proxy.errors import DigestInvalid, TagInvalid
from proxy.mediatypes import OCI_INDEX
from proxy.reference import DIGEST_RE, MAX_NAME_LENGTH, Digest, is_tag
from proxy.untrusted import loads_json

#: cosign's tag suffixes and what each holds.
COSIGN_SUFFIXES: dict[str, str] = {"sig": "signature", "att": "attestation", "sbom": "sbom"}

_NOT_TAG_CHARS = re.compile(r"[^a-zA-Z0-9._-]")
#: ``sha256-<64 hex>``, optionally with a cosign suffix: the only form that maps back to a
#: digest (a truncated sha512 or an unknown algorithm cannot be turned back).
_SHA256_TAG = re.compile(r"sha256-([a-f0-9]{64})(?:\.(sig|att|sbom))?")
#: Bounds on a referrers list we accept from an upstream (a list is one JSON document).
MAX_REFERRERS = 10_000
MAX_ANNOTATION_BYTES = 64 << 10


def referrers_tag(digest: Digest | str) -> str:
    """The referrers tag schema's tag for ``digest``: the algorithm truncated to 32
    characters, ``-``, the encoded part truncated to 64, any character outside the tag
    grammar replaced by ``-`` (so ``sha512`` digests are cut to 64 hex digits)."""
    if isinstance(digest, Digest):
        algorithm, encoded = digest.algorithm, digest.hex
    else:
        m = DIGEST_RE.fullmatch(digest)
        if m is None:
            raise DigestInvalid(f"invalid digest {digest[:200]!r}")
        algorithm, encoded = m.groups()
    return _NOT_TAG_CHARS.sub("-", f"{algorithm[:32]}-{encoded[:64]}")


def cosign_tag(digest: Digest, kind: str = "sig") -> str:
    """cosign's tag for the ``kind`` (``sig``, ``att`` or ``sbom``) of ``digest``:
    ``sha256-<hex>.sig``. Defined for sha256 only: a sha512 digest would not fit the
    128-character tag grammar, and cosign signs sha256 digests."""
    if kind not in COSIGN_SUFFIXES:
        raise ValueError(f"unknown cosign tag kind {kind!r} (sig, att or sbom)")
    tag = f"{digest.algorithm}-{digest.hex}.{kind}"
    if digest.algorithm != "sha256" or not is_tag(tag):
        raise TagInvalid(f"no cosign tag for {digest.algorithm} digests")
    return tag


@dataclass(frozen=True, slots=True)
class AttachedTag:
    """What a tag of one of the two conventions names."""

    subject: Digest  #: the manifest the artifacts are attached to
    kind: str | None  #: ``None``: the referrers list; else ``sig``, ``att`` or ``sbom``


def parse_attached_tag(tag: str) -> AttachedTag | None:
    """The subject (and cosign kind) a ``sha256-<hex>[.sig|.att|.sbom]`` tag names; ``None``
    for any other tag (a version, ``latest``, or a schema tag that cannot be turned back
    into a digest)."""
    m = _SHA256_TAG.fullmatch(tag)
    if m is None:
        return None
    return AttachedTag(Digest("sha256", m.group(1)), m.group(2))


def is_attached_tag(tag: str) -> bool:
    """Whether ``tag`` names a digest's attachments rather than a version."""
    return _SHA256_TAG.fullmatch(tag) is not None


def _descriptor(entry: Any) -> dict[str, Any] | None:
    """A well-formed referrer descriptor (``mediaType``, ``digest``, ``size``; optional
    ``artifactType`` and string ``annotations``), copied; ``None`` when malformed."""
    if not isinstance(entry, dict):
        return None
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    if not isinstance(media_type, str) or not media_type or len(media_type) > MAX_NAME_LENGTH:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    try:
        parsed = Digest.parse(digest) if isinstance(digest, str) else None
    except DigestInvalid:
        parsed = None
    if parsed is None:
        return None
    out: dict[str, Any] = {"mediaType": media_type, "digest": str(parsed), "size": size}
    artifact_type = entry.get("artifactType")
    if artifact_type is not None:
        if not isinstance(artifact_type, str):
            return None
        out["artifactType"] = artifact_type
    annotations = entry.get("annotations")
    if annotations is not None:
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            return None
        if sum(len(k) + len(v) for k, v in annotations.items()) > MAX_ANNOTATION_BYTES:
            return None
        out["annotations"] = dict(annotations)
    return out


def parse_referrers_index(data: bytes) -> list[dict[str, Any]] | None:
    """The descriptors of a referrers list (an upstream's referrers API answer, or the
    image index of a referrers schema tag); ``None`` when ``data`` is not an image index
    (the spec: then assume there are no referrers). Malformed entries are dropped."""
    try:
        doc = loads_json(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        return None
    if doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
        return None
    manifests = doc.get("manifests")
    if not isinstance(manifests, list) or len(manifests) > MAX_REFERRERS:
        return None
    return [d for d in map(_descriptor, manifests) if d is not None]


def filter_referrers(entries: list[dict[str, Any]], artifact_type: str | None) -> list[dict[str, Any]]:
    """The entries whose ``artifactType`` is ``artifact_type`` (all of them for ``None``):
    the ``?artifactType=`` filter, for upstreams that ignore it (their answer then lacks
    ``OCI-Filters-Applied``) and for referrers schema tags."""
    if artifact_type is None:
        return list(entries)
    return [e for e in entries if e.get("artifactType") == artifact_type]


def referrers_index(entries: list[dict[str, Any]]) -> bytes:
    """The referrers API's answer: an OCI image index of ``entries``."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                      separators=(",", ":")).encode()


def referrer_descriptor(digest: Digest, media_type: str, data: bytes,
                        subject: Digest | None = None) -> dict[str, Any] | None:
    """The referrers list's descriptor of a manifest (its own bytes: media type, size,
    ``artifactType`` or else the config's media type, annotations); ``None`` when it is not
    a JSON object, or (``subject`` given) when its ``subject`` is not ``subject``, so a
    list can only name manifests that really refer to the digest."""
    try:
        doc = loads_json(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if subject is not None:
        named = doc.get("subject")
        if not isinstance(named, dict) or named.get("digest") != str(subject):
            return None
    config = doc.get("config")
    art = doc.get("artifactType") or (config.get("mediaType") if isinstance(config, dict) else None)
    entry: dict[str, Any] = {"mediaType": media_type, "digest": str(digest), "size": len(data)}
    if art:
        entry["artifactType"] = art
    if doc.get("annotations"):
        entry["annotations"] = doc["annotations"]
    return _descriptor(entry)
