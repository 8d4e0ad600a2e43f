"""Cosign-style image signatures: is this manifest digest signed by one of these keys?

**What is verified** (cosign's classic key-pair signatures, ``cosign sign --key``; the
default of cosign 2, and cosign 3 with ``--new-bundle-format=false``):

1. The signature manifest, the manifest of the subject's ``sha256-<hex>.sig`` tag in the
   same repository, is found by tag and trusted for nothing: it only points at candidates,
   its layers of type ``application/vnd.dev.cosign.simplesigning.v1+json`` carrying a
   ``dev.cosignproject.cosign/signature`` annotation (base64 of a DER ECDSA signature).
2. Each candidate's blob, the *payload*, is fetched and its bytes checked against the
   layer's digest and a size bound before anything reads them.
3. The signature is checked over the payload's exact bytes (ECDSA P-256 with SHA-256)
   against each configured public key.
4. Only then is the payload parsed, strictly (JSON, no duplicate keys): a simple-signing
   document whose ``critical.type`` is ``cosign container image signature`` and whose
   ``critical.image.docker-manifest-digest`` is the digest being pulled.

One candidate passing all four verifies the digest.

**What is not verified**, and fails unless it also carries a signature one of the keys makes:

* keyless signatures: the Fulcio certificate and chain annotations
  (``dev.sigstore.cosign/certificate``, ``.../chain``) are ignored, so no identity or issuer
  is checked;
* Rekor: the transparency-log bundle (``dev.sigstore.cosign/bundle``) and signed
  timestamps are ignored: nothing proves a signature was logged, or when it was made;
* cosign 3's default Sigstore bundle format (pushed as an OCI 1.1 referrer), notation
  (Notary v2) signatures, and attestations or SBOMs (``.att``, ``.sbom``, DSSE envelopes);
* ``critical.identity.docker-reference`` (cosign ignores it too: a signature of the same
  digest made under another repository name verifies) and the ``optional`` claims;
* keys other than ECDSA P-256 (RSA, Ed25519, KMS URIs): refused when configured.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.errors import BlobUnknown, Denied, DigestInvalid, TagInvalid
from proxy.policy.referrers import cosign_tag
from proxy.policy.rules import compile_repository_patterns, parse_repository_patterns
from proxy.reference import Digest
from proxy.settings.fields import ConfigError, take_keys

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
CERTIFICATE_ANNOTATION = "dev.sigstore.cosign/certificate"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"
#: A simple-signing payload is a few hundred bytes; more is not one.
MAX_PAYLOAD = 64 << 10
#: Candidates tried per signature manifest (each costs a blob fetch).
MAX_SIGNATURES = 32

#: Fetches a blob of the signature's repository by digest (pull-through, so cached).
BlobFetcher = Callable[[Digest], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A public key signatures are checked against, and how messages name it."""

    key: ec.EllipticCurvePublicKey
    id: str  #: ``sha256:<16 hex>`` of the key's SubjectPublicKeyInfo


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a digest is signed, and why (or why not)."""

    verified: bool
    reason: str
    key_id: str | None = None  #: the key that verified
    payload: str | None = None  #: digest of the payload blob that verified

    def error(self, what: str) -> Denied:
        """The ``DENIED`` error for pulling ``what`` without a valid signature."""
        return Denied(f"{what} is not signed by a trusted key: {self.reason}")


def load_key(key: str, pem: bytes) -> TrustedKey:
    """A PEM public key (``cosign.pub``); ``key`` names the setting in errors."""
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(key, f"not a PEM public key such as cosign.pub ({exc})") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        kind = public.curve.name if isinstance(public, ec.EllipticCurvePublicKey) else type(public).__name__
        raise ConfigError(key, f"only ECDSA P-256 public keys (cosign generate-key-pair) are "
                               f"verified, got {kind}")
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return TrustedKey(public, "sha256:" + hashlib.sha256(der).hexdigest()[:16])


def parse_keys(key: str, value: Any, base_dir: Path) -> tuple[TrustedKey, ...]:
    """``keys = [...]``: each a PEM text (``-----BEGIN PUBLIC KEY-----...``) or a file
    holding one (relative to ``base_dir``); read and checked now, so a bad key stops
    start-up, not a pull."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"expected a non-empty list of public keys (PEM text or files), got {value!r}")
    keys = []
    for item in value:
        if item.lstrip().startswith("-----BEGIN"):
            keys.append(load_key(key, item.encode()))
            continue
        path = Path(item).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
        keys.append(load_key(f"{key} ({path})", data))
    return tuple(keys)


def unsigned(subject: Digest) -> Verdict:
    """The verdict when the subject has no signature manifest at all."""
    try:
        return Verdict(False, f"no signature (no {cosign_tag(subject)} tag)")
    except TagInvalid:
        return Verdict(False, f"no signature (cosign signs sha256 digests, not {subject.algorithm})")


def _strict_json(data: bytes) -> Any:
    """``json.loads`` of UTF-8 only, refusing duplicate keys: two parsers (cosign's and
    ours) must not read two different documents from one payload. (``json.loads`` of
    bytes would also take UTF-16 and UTF-32.)"""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=pairs)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _signed_digest(payload: bytes) -> str:
    """The manifest digest a (signature-verified) simple-signing payload names; ValueError
    with the reason when it is not one."""
    doc = _strict_json(payload)
    critical = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(critical, dict):
        raise ValueError("no \"critical\" section")
    if critical.get("type") != COSIGN_SIGNATURE_TYPE:
        raise ValueError(f"critical.type is {str(critical.get('type'))[:100]!r}, "
                         f"not {COSIGN_SIGNATURE_TYPE!r}")
    image = critical.get("image")
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(digest, str):
        raise ValueError("no critical.image.docker-manifest-digest")
    return digest


def verify_payload(payload: bytes, signature: str, subject: Digest,
                   keys: Sequence[TrustedKey]) -> Verdict:
    """Steps 3 and 4 of the module docstring for one payload and its base64 signature."""
    try:
        der = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return Verdict(False, "the signature annotation is not base64")
    trusted = None
    for candidate in keys:
        try:
            candidate.key.verify(der, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        trusted = candidate
        break
    if trusted is None:
        which = "the trusted key" if len(keys) == 1 else f"any of the {len(keys)} trusted keys"
        return Verdict(False, f"the signature does not verify with {which}")
    try:
        signed = _signed_digest(payload)
    except ValueError as exc:
        return Verdict(False, f"the signed payload is not a cosign simple-signing document: {exc}")
    if signed != str(subject):
        return Verdict(False, f"the signature is for {signed[:100]}, not {subject}")
    return Verdict(True, f"signed by key {trusted.id}", key_id=trusted.id)


async def verify_signature_manifest(manifest: bytes, subject: Digest, keys: Sequence[TrustedKey],
                                    fetch_blob: BlobFetcher) -> Verdict:
    """Whether ``manifest`` (the ``sha256-<hex>.sig`` tag's) holds a signature of
    ``subject`` by one of ``keys``. Payload blobs come from ``fetch_blob`` and are checked
    against their digests here; a payload the upstream does not have (``BlobUnknown``)
    fails that candidate, any other error of ``fetch_blob`` (an outage) propagates, so it
    can be answered as one rather than as an unsigned image."""
    try:
        doc = _strict_json(manifest)
    except ValueError as exc:
        return Verdict(False, f"the signature manifest is not JSON ({exc})")
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        return Verdict(False, "the signature manifest has no layers")
    reasons: list[str] = []
    tried = 0
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
            continue
        annotations = layer.get("annotations")
        signature = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
        if not isinstance(signature, str):
            continue
        if tried == MAX_SIGNATURES:
            reasons.append(f"only the first {MAX_SIGNATURES} signatures were tried")
            break
        tried += 1
        verdict = await _verify_layer(layer, signature, subject, keys, fetch_blob)
        if verdict.verified:
            return verdict
        keyless = isinstance(annotations, dict) and CERTIFICATE_ANNOTATION in annotations
        reasons.append(verdict.reason + (" (keyless certificates are not verified)" if keyless else ""))
    if not tried:
        return Verdict(False, f"the signature manifest holds no cosign signature "
                              f"({SIGNATURE_ANNOTATION} on a {SIMPLE_SIGNING} layer)")
    return Verdict(False, "; ".join(dict.fromkeys(reasons)))


async def _verify_layer(layer: dict[str, Any], signature: str, subject: Digest,
                        keys: Sequence[TrustedKey], fetch_blob: BlobFetcher) -> Verdict:
    raw = layer.get("digest")
    try:
        digest = Digest.parse(raw if isinstance(raw, str) else "")
    except DigestInvalid:
        return Verdict(False, "a signature layer has no valid digest")
    size = layer.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_PAYLOAD:
        return Verdict(False, f"payload {digest} is not a simple-signing payload (size {size!r})")
    try:
        payload = await fetch_blob(digest)
    except BlobUnknown:
        return Verdict(False, f"payload {digest} is missing upstream")
    if len(payload) != size or Digest.of(payload, digest.algorithm) != digest:
        return Verdict(False, f"payload {digest} does not match its digest")
    verdict = verify_payload(payload, signature, subject, keys)
    if not verdict.verified:
        return verdict
    return Verdict(True, verdict.reason, key_id=verdict.key_id, payload=str(digest))


@dataclass(frozen=True)
class SignaturePolicy:
    """``require_signature = { keys = [...], repositories = [...] }`` of an upstream: pulls
    of manifests of the matching repositories (all without ``repositories``) need a
    signature one of ``keys`` made."""

    keys: tuple[TrustedKey, ...]
    repositories: tuple[str, ...] = ("**",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_repos", compile_repository_patterns(self.repositories))

    def applies(self, repository: str) -> bool:
        """Whether pulls of ``repository`` (as named on the upstream) need a signature."""
        pattern: re.Pattern[str] = getattr(self, "_repos")  # noqa: B009 (set in __post_init__)
        return pattern.fullmatch(repository) is not None

    def __repr__(self) -> str:
        return f"SignaturePolicy({[k.id for k in self.keys]}, repositories={list(self.repositories)})"


def parse_signature_policy(key: str, raw: Any, base_dir: Path) -> SignaturePolicy:
    """An upstream's ``require_signature`` table (``key`` names it in errors)."""
    t = take_keys(raw, key, {"keys", "repositories"})
    if "keys" not in t:
        raise ConfigError(f"{key}.keys", "missing (the public keys, e.g. keys = [\"cosign.pub\"])")
    keys = parse_keys(f"{key}.keys", t["keys"], base_dir)
    if "repositories" not in t:
        return SignaturePolicy(keys)
    return SignaturePolicy(keys, parse_repository_patterns(f"{key}.repositories", t["repositories"]))
