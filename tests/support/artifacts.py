"""Supply-chain artifacts for tests, built byte for byte as their tools make them: an OCI 1.1
artifact manifest with a ``subject``, a referrers schema index, and a cosign key-pair
signature (simple signing, ECDSA P-256 over the payload's exact bytes, as ``cosign sign
--key`` pushes it under ``sha256-<hex>.sig``). Each comes as ``Built`` (the manifest and its
blobs), to push through the V2 API (:func:`push_built`) or to put in the fake upstream."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.fake_upstream import FakeUpstream
from tests.support.images import push_blob, push_manifest, sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"


@dataclass
class Built:
    """A manifest and the blobs it names."""

    manifest: bytes
    media_type: str
    blobs: list[bytes] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    def descriptor(self) -> dict[str, object]:
        doc = json.loads(self.manifest)
        out: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest,
                                  "size": len(self.manifest)}
        if "artifactType" in doc:
            out["artifactType"] = doc["artifactType"]
        return out


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def artifact(subject_digest: str, subject_size: int, artifact_type: str, content: bytes,
             subject_type: str = OCI_MANIFEST, annotations: dict[str, str] | None = None) -> Built:
    """An OCI 1.1 artifact manifest (empty config, one layer) whose subject is the digest."""
    empty = b"{}"
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(empty), "size": len(empty)},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256_digest(content),
                    "size": len(content)}],
        "subject": {"mediaType": subject_type, "digest": subject_digest, "size": subject_size},
    }
    if annotations:
        doc["annotations"] = annotations
    return Built(_dumps(doc), OCI_MANIFEST, [empty, content])


def schema_index(descriptors: list[dict[str, object]]) -> Built:
    """The referrers tag schema's index (what a client pushes to ``sha256-<hex>``)."""
    return Built(_dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}),
                 OCI_INDEX)


def signing_key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh ECDSA P-256 key pair: the private key and the public key's PEM (cosign.pub)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem.decode()


def simple_signing_payload(manifest_digest: str, reference: str) -> bytes:
    """cosign's payload: the claims its signature covers."""
    return _dumps({"critical": {"identity": {"docker-reference": reference},
                                "image": {"docker-manifest-digest": manifest_digest},
                                "type": "cosign container image signature"},
                   "optional": None})


def cosign_signature(key: ec.EllipticCurvePrivateKey, manifest_digest: str, reference: str,
                     *, payload: bytes | None = None) -> Built:
    """The signature manifest cosign pushes for ``manifest_digest`` (``payload`` overrides
    the signed claims, to sign something else)."""
    payload = payload if payload is not None else simple_signing_payload(manifest_digest, reference)
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    config = _dumps({"architecture": "", "os": "", "config": {},
                     "rootfs": {"type": "layers", "diff_ids": [sha256_digest(payload)]}})
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": sha256_digest(config), "size": len(config)},
           "layers": [{"mediaType": SIMPLE_SIGNING, "digest": sha256_digest(payload),
                       "size": len(payload),
                       "annotations": {"dev.cosignproject.cosign/signature": signature}}]}
    return Built(_dumps(doc), OCI_MANIFEST, [config, payload])


def sig_tag(digest: str) -> str:
    """cosign's signature tag of a manifest digest."""
    return digest.replace(":", "-") + ".sig"


async def push_built(session: aiohttp.ClientSession, base: str, repo: str, built: Built,
                     tag: str | None = None) -> str:
    """Push the blobs, then the manifest (by ``tag``, else by digest), through the V2 API."""
    for blob in built.blobs:
        await push_blob(session, base, repo, blob, skip_existing=True)
    return await push_manifest(session, base, repo, tag or built.digest, built.manifest,
                               built.media_type)


def add_built(fake: FakeUpstream, repo: str, built: Built, tag: str | None = None) -> str:
    """Put ``built`` in the fake upstream (by digest, and under ``tag``)."""
    for blob in built.blobs:
        fake.add_blob(blob)
    fake.add_manifest(repo, None, built.manifest, built.media_type)
    if tag is not None:
        fake.add_manifest(repo, tag, built.manifest, built.media_type)
    return built.digest
