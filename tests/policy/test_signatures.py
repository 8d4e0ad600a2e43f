"""Cosign-style signature verification (proxy/policy/signatures.py).

Signatures are made here with ``cryptography`` (no cosign binary can be had from the
package registries this project uses: Debian has no ``cosign`` package and PyPI none of
that name), and checked against real cosign output too: the published test vectors of
containers/image (``signature/fixtures/dir-img-cosign-valid``, Apache-2.0), a manifest,
the simple-signing payload cosign signed for it, two signatures by ``cosign.pub`` and one
by a key not published.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.config import ConfigError
from proxy.errors import BlobUnknown, Denied, Unavailable
from proxy.policy.signatures import (
    CERTIFICATE_ANNOTATION,
    MAX_SIGNATURES,
    SIGNATURE_ANNOTATION,
    SIMPLE_SIGNING,
    TrustedKey,
    load_key,
    parse_keys,
    unsigned,
    verify_payload,
    verify_signature_manifest,
)
from proxy.reference import Digest

# --- containers/image's cosign fixtures (signature/fixtures at df7e80d2) -----------------------
#: dir-img-cosign-valid/manifest.json: the signed image manifest
VECTOR_MANIFEST = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
    b'"config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":1512,'
    b'"digest":"sha256:961769676411f082461f9ef46626dd7a2d1e2b2a38e6a44364bcbecf51e66dd4"},'
    b'"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":2896510,'
    b'"digest":"sha256:9d16cba9fb961d1aafec9542f2bf7cb64acfc55245f9e4eb5abecd4cdc38d749"}]}')
#: the payload of dir-img-cosign-valid/signature-1 (and of the two below)
VECTOR_PAYLOAD = base64.b64decode(
    "eyJjcml0aWNhbCI6eyJpZGVudGl0eSI6eyJkb2NrZXItcmVmZXJlbmNlIjoiMTkyLjE2OC42NC4yOjUwMDAvY29z"
    "aWduLXNpZ25lZC1zaW5nbGUtc2FtcGxlIn0sImltYWdlIjp7ImRvY2tlci1tYW5pZmVzdC1kaWdlc3QiOiJzaGEy"
    "NTY6NjM0YThmMzViNWYxNmRjZjRhYWEwODIyYWRjMGIxOTY0YmI3ODZmY2ExMmY2ODMxZGU4ZGRjNDVlNTk4NmEw"
    "MCJ9LCJ0eXBlIjoiY29zaWduIGNvbnRhaW5lciBpbWFnZSBzaWduYXR1cmUifSwib3B0aW9uYWwiOm51bGx9")
#: the dev.cosignproject.cosign/signature annotations of signature-1 and valid-2/signature-2
VECTOR_SIGNATURES = (
    "MEYCIQDmtamqYPjMg81nqeBhptrPls44aA/r7PwLmspINJY4MwIhANKRpqe2E9UCBtGFdPoz/8jAbaQm4uP4h+IpwKTE6ClR",
    "MEQCID1ChQZ8l7JeDTEFJ2F9BXAQSVlnp5P8q+l4UJrZnTHqAiB2aeJdrdFVSKgfxt5xidTHIx/QCg6H+g8AXwu1G3d5oQ==",
)
#: unknown-cosign-key.signature: the same payload signed by an unpublished key
VECTOR_UNKNOWN_KEY_SIGNATURE = (
    "MEQCIH9Tuia53Kf88YlZ5GJY6vTykz3q69SW7Z2+ZUaWJXCYAiBL3pO+RsiJLHywzdbpQmMSjrzACeDs6MhT5P8GQw2jAw==")
VECTOR_COSIGN_PUB = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEFNLqFhf4fiN6o/glAuYnq2jYUeL0
vRuLu/z39pmbVwS9ff5AYnlwaP9sxREajdLY9ynM6G1sy6AAmb7Z63TsLg==
-----END PUBLIC KEY-----
"""
VECTOR_COSIGN2_PUB = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEwOkOF9xpfG8ghueIhnZ66ooujwt1
+ReV3HupgKnGFYnEh3Hh1YTg5L6kN1Yakkt5WltRoav8/R3hpCtUO3Rldw==
-----END PUBLIC KEY-----
"""

IMAGE = Digest.of(b"an image manifest")
OTHER = Digest.of(b"another image manifest")


# --- helpers: signing as cosign does ----------------------------------------------------------

class Signer:
    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.trusted = load_key("test", self.public_pem())

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self.private.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def payload_for(digest: Digest | str, **critical) -> bytes:
    doc = {"critical": {"identity": {"docker-reference": "registry.example/app"},
                        "image": {"docker-manifest-digest": str(digest)},
                        "type": "cosign container image signature", **critical},
           "optional": None}
    return json.dumps(doc, separators=(",", ":")).encode()


def layer(payload: bytes, signature: str | None, **annotations) -> dict:
    ann = dict(annotations)
    if signature is not None:
        ann[SIGNATURE_ANNOTATION] = signature
    return {"mediaType": SIMPLE_SIGNING, "size": len(payload),
            "digest": str(Digest.of(payload)), "annotations": ann}


def signature_manifest(*layers: dict) -> bytes:
    """The manifest cosign pushes to ``sha256-<hex>.sig``."""
    config = b"{}"
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "size": len(config), "digest": str(Digest.of(config))},
                       "layers": list(layers)}).encode()


class Blobs:
    """A blob store the verifier fetches payloads from, recording what it asked for."""

    def __init__(self, *payloads: bytes) -> None:
        self.by_digest = {Digest.of(p): p for p in payloads}
        self.fetched: list[Digest] = []

    async def __call__(self, digest: Digest) -> bytes:
        self.fetched.append(digest)
        if digest not in self.by_digest:
            raise BlobUnknown(f"blob {digest} unknown")
        return self.by_digest[digest]


async def verify(manifest: bytes, keys, blobs: Blobs, subject: Digest = IMAGE):
    return await verify_signature_manifest(manifest, subject, keys, blobs)


# --- published vectors: real cosign output ------------------------------------------------------

def test_vector_manifest_digest_is_the_signed_one():
    assert str(Digest.of(VECTOR_MANIFEST)) == \
        "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"


@pytest.mark.parametrize("signature", VECTOR_SIGNATURES)
async def test_real_cosign_signatures_verify(signature):
    key = load_key("k", VECTOR_COSIGN_PUB)
    subject = Digest.of(VECTOR_MANIFEST)
    blobs = Blobs(VECTOR_PAYLOAD)
    verdict = await verify(signature_manifest(layer(VECTOR_PAYLOAD, signature)), [key], blobs, subject)
    assert verdict.verified, verdict.reason
    assert verdict.key_id == key.id and verdict.payload == str(Digest.of(VECTOR_PAYLOAD))
    assert verdict.reason == f"signed by key {key.id}"


async def test_real_cosign_signature_with_the_wrong_key():
    subject = Digest.of(VECTOR_MANIFEST)
    other = load_key("k", VECTOR_COSIGN2_PUB)
    verdict = verify_payload(VECTOR_PAYLOAD, VECTOR_SIGNATURES[0], subject, [other])
    assert not verdict.verified
    assert verdict.reason == "the signature does not verify with the trusted key"


async def test_real_signature_by_an_unknown_key_does_not_verify():
    subject = Digest.of(VECTOR_MANIFEST)
    keys = [load_key("a", VECTOR_COSIGN_PUB), load_key("b", VECTOR_COSIGN2_PUB)]
    verdict = verify_payload(VECTOR_PAYLOAD, VECTOR_UNKNOWN_KEY_SIGNATURE, subject, keys)
    assert not verdict.verified
    assert verdict.reason == "the signature does not verify with any of the 2 trusted keys"


async def test_real_signature_for_another_digest():
    verdict = verify_payload(VECTOR_PAYLOAD, VECTOR_SIGNATURES[0], IMAGE, [load_key("k", VECTOR_COSIGN_PUB)])
    assert not verdict.verified
    assert verdict.reason == (
        "the signature is for sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00, "
        f"not {IMAGE}")


# --- signatures made here ------------------------------------------------------------------------

async def test_valid_signature():
    signer = Signer()
    payload = payload_for(IMAGE)
    blobs = Blobs(payload)
    verdict = await verify(signature_manifest(layer(payload, signer.sign(payload))), [signer.trusted], blobs)
    assert verdict.verified and verdict.key_id == signer.trusted.id
    assert blobs.fetched == [Digest.of(payload)]


async def test_wrong_key():
    signer, stranger = Signer(), Signer()
    payload = payload_for(IMAGE)
    verdict = await verify(signature_manifest(layer(payload, stranger.sign(payload))),
                           [signer.trusted], Blobs(payload))
    assert not verdict.verified
    assert verdict.reason == "the signature does not verify with the trusted key"


async def test_any_of_several_keys():
    keys = [Signer(), Signer(), Signer()]
    payload = payload_for(IMAGE)
    verdict = await verify(signature_manifest(layer(payload, keys[2].sign(payload))),
                           [k.trusted for k in keys], Blobs(payload))
    assert verdict.verified and verdict.key_id == keys[2].trusted.id


async def test_signed_payload_for_another_digest():
    signer = Signer()
    payload = payload_for(OTHER)
    verdict = await verify(signature_manifest(layer(payload, signer.sign(payload))), [signer.trusted],
                           Blobs(payload))
    assert not verdict.verified
    assert verdict.reason == f"the signature is for {OTHER}, not {IMAGE}"


async def test_tampered_payload():
    """The payload's bytes changed after signing (its blob digest recomputed to match)."""
    signer = Signer()
    signed = payload_for(OTHER)
    tampered = signed.replace(str(OTHER).encode(), str(IMAGE).encode())
    verdict = await verify(signature_manifest(layer(tampered, signer.sign(signed))), [signer.trusted],
                           Blobs(tampered))
    assert not verdict.verified
    assert "does not verify" in verdict.reason


async def test_substituted_payload_bytes_are_caught_by_digest():
    """A mirror answering the payload's digest with other bytes is caught before parsing."""
    signer = Signer()
    payload = payload_for(IMAGE)
    blobs = Blobs()
    blobs.by_digest[Digest.of(payload)] = payload_for(IMAGE, extra="x")
    verdict = await verify(signature_manifest(layer(payload, signer.sign(payload))), [signer.trusted], blobs)
    assert not verdict.verified
    assert verdict.reason == f"payload {Digest.of(payload)} does not match its digest"


async def test_missing_annotation():
    signer = Signer()
    payload = payload_for(IMAGE)
    blobs = Blobs(payload)
    verdict = await verify(signature_manifest(layer(payload, None)), [signer.trusted], blobs)
    assert not verdict.verified
    assert verdict.reason.startswith("the signature manifest holds no cosign signature")
    assert blobs.fetched == []  # nothing to check: nothing fetched


async def test_other_layer_types_are_not_candidates():
    signer = Signer()
    payload = payload_for(IMAGE)
    other = dict(layer(payload, signer.sign(payload)), mediaType="application/vnd.in-toto+json")
    verdict = await verify(signature_manifest(other), [signer.trusted], Blobs(payload))
    assert not verdict.verified and "holds no cosign signature" in verdict.reason


@pytest.mark.parametrize("bad", ["not base64!", "QUJD=", "====", "QUJDRA==\x00"])
async def test_malformed_base64(bad):
    signer = Signer()
    payload = payload_for(IMAGE)
    verdict = await verify(signature_manifest(layer(payload, bad)), [signer.trusted], Blobs(payload))
    assert not verdict.verified
    assert verdict.reason in ("the signature annotation is not base64",
                              "the signature does not verify with the trusted key")


async def test_base64_of_garbage_is_a_bad_signature():
    signer = Signer()
    payload = payload_for(IMAGE)
    verdict = await verify(signature_manifest(layer(payload, base64.b64encode(b"garbage").decode())),
                           [signer.trusted], Blobs(payload))
    assert verdict.reason == "the signature does not verify with the trusted key"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "Expecting value"),
    (b"[]", "no \"critical\" section"),
    (b'{"critical": "x"}', "no \"critical\" section"),
    (json.dumps({"critical": {"type": "other", "image": {"docker-manifest-digest": str(IMAGE)}}}).encode(),
     "critical.type is 'other'"),
    (json.dumps({"critical": {"type": "cosign container image signature"}}).encode(),
     "no critical.image.docker-manifest-digest"),
    (json.dumps({"critical": {"type": "cosign container image signature",
                              "image": {"Docker-manifest-digest": str(IMAGE)}}}).encode(),
     "no critical.image.docker-manifest-digest"),   # keys are exact, as cosign writes them
    (json.dumps({"critical": {"type": "cosign container image signature",
                              "image": {"docker-manifest-digest": 5}}}).encode(),
     "no critical.image.docker-manifest-digest"),
    (b'{"critical":{"type":"cosign container image signature","image":{"docker-manifest-digest":"'
     + str(OTHER).encode() + b'","docker-manifest-digest":"' + str(IMAGE).encode() + b'"}}}',
     "duplicate key 'docker-manifest-digest'"),
    (b"\xff\xfe", "codec"),
    (payload_for(IMAGE).decode().encode("utf-16"), "codec"),   # Python would read UTF-16, Go not
    (b"[" * 50_000, "nested too deeply"),
])
async def test_signed_but_malformed_payloads(payload, reason):
    """Validly signed, so the parse is reached: each is refused with the reason."""
    signer = Signer()
    verdict = verify_payload(payload, signer.sign(payload), IMAGE, [signer.trusted])
    assert not verdict.verified
    assert verdict.reason.startswith("the signed payload is not a cosign simple-signing document")
    assert reason in verdict.reason


async def test_oversized_or_odd_layers_are_not_fetched():
    signer = Signer()
    payload = payload_for(IMAGE)
    sig = signer.sign(payload)
    huge = dict(layer(payload, sig), size=1 << 20)
    no_size = {k: v for k, v in layer(payload, sig).items() if k != "size"}
    bad_digest = dict(layer(payload, sig), digest="sha256:nope")
    blobs = Blobs(payload)
    verdict = await verify(signature_manifest(huge, no_size, bad_digest), [signer.trusted], blobs)
    assert not verdict.verified and blobs.fetched == []
    assert "is not a simple-signing payload (size 1048576)" in verdict.reason
    assert "(size None)" in verdict.reason
    assert "a signature layer has no valid digest" in verdict.reason


async def test_size_must_match_too():
    signer = Signer()
    payload = payload_for(IMAGE)
    verdict = await verify(signature_manifest(dict(layer(payload, signer.sign(payload)),
                                                   size=len(payload) - 1)),
                           [signer.trusted], Blobs(payload))
    assert verdict.reason.endswith("does not match its digest")


async def test_one_good_signature_among_bad_ones():
    signer, stranger = Signer(), Signer()
    good = payload_for(IMAGE)
    other = payload_for(OTHER)
    manifest = signature_manifest(layer(other, signer.sign(other)), layer(good, stranger.sign(good)),
                                  layer(good, signer.sign(good)))
    verdict = await verify(manifest, [signer.trusted], Blobs(good, other))
    assert verdict.verified and verdict.payload == str(Digest.of(good))


async def test_reasons_of_every_candidate_are_reported_once():
    signer, stranger = Signer(), Signer()
    payload = payload_for(IMAGE)
    bad = stranger.sign(payload)
    verdict = await verify(signature_manifest(layer(payload, bad), layer(payload, bad),
                                              layer(payload_for(OTHER), signer.sign(payload_for(OTHER)))),
                           [signer.trusted], Blobs(payload, payload_for(OTHER)))
    assert verdict.reason == ("the signature does not verify with the trusted key; "
                              f"the signature is for {OTHER}, not {IMAGE}")


async def test_keyless_signatures_are_not_verified():
    """A Fulcio-certificate signature is made with an ephemeral key no operator configures."""
    ephemeral, signer = Signer(), Signer()
    payload = payload_for(IMAGE)
    keyless = layer(payload, ephemeral.sign(payload), **{
        CERTIFICATE_ANNOTATION: "-----BEGIN CERTIFICATE-----\n...", "dev.sigstore.cosign/bundle": "{}"})
    verdict = await verify(signature_manifest(keyless), [signer.trusted], Blobs(payload))
    assert not verdict.verified
    assert verdict.reason == ("the signature does not verify with the trusted key "
                              "(keyless certificates are not verified)")


async def test_missing_payload_blob_fails_that_candidate():
    signer = Signer()
    payload = payload_for(IMAGE)
    verdict = await verify(signature_manifest(layer(payload, signer.sign(payload))), [signer.trusted],
                           Blobs())
    assert verdict.reason == f"payload {Digest.of(payload)} is missing upstream"


async def test_an_outage_while_fetching_propagates():
    signer = Signer()
    payload = payload_for(IMAGE)

    async def down(digest: Digest) -> bytes:
        raise Unavailable("upstream down")

    with pytest.raises(Unavailable):
        await verify_signature_manifest(signature_manifest(layer(payload, signer.sign(payload))), IMAGE,
                                        [signer.trusted], down)


async def test_candidates_are_bounded():
    signer, stranger = Signer(), Signer()
    payload = payload_for(IMAGE)
    blobs = Blobs(payload)
    bad = layer(payload, stranger.sign(payload))
    manifest = signature_manifest(*[bad] * (MAX_SIGNATURES + 5), layer(payload, signer.sign(payload)))
    verdict = await verify(manifest, [signer.trusted], blobs)
    assert not verdict.verified and len(blobs.fetched) == MAX_SIGNATURES
    assert f"only the first {MAX_SIGNATURES} signatures were tried" in verdict.reason


@pytest.mark.parametrize(("manifest", "reason"), [
    (b"<html>", "the signature manifest is not JSON"),
    (b"[]", "the signature manifest has no layers"),
    (b'{"layers": {}}', "the signature manifest has no layers"),
    (b'{"layers": [1, "x", null]}', "holds no cosign signature"),
    (b'{"layers": [], "layers": []}', "duplicate key 'layers'"),
])
async def test_malformed_signature_manifests(manifest, reason):
    verdict = await verify(manifest, [Signer().trusted], Blobs())
    assert not verdict.verified and reason in verdict.reason


def test_unsigned_and_the_denied_error():
    verdict = unsigned(IMAGE)
    assert not verdict.verified
    assert verdict.reason == f"no signature (no sha256-{IMAGE.hex}.sig tag)"
    err = verdict.error("library/alpine:3.19")
    assert isinstance(err, Denied) and (err.status, err.code) == (403, "DENIED")
    assert err.message == ("library/alpine:3.19 is not signed by a trusted key: "
                           f"no signature (no sha256-{IMAGE.hex}.sig tag)")
    assert "sha256 digests" in unsigned(Digest.parse("sha512:" + "0" * 128)).reason


# --- keys ---------------------------------------------------------------------------------------------

def test_key_ids_name_the_key():
    a = load_key("k", VECTOR_COSIGN_PUB)
    der = a.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert a.id == "sha256:" + hashlib.sha256(der).hexdigest()[:16]
    assert a.id != load_key("k", VECTOR_COSIGN2_PUB).id
    assert isinstance(a, TrustedKey)


def test_parse_keys_from_text_and_files(tmp_path: Path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "cosign.pub").write_bytes(VECTOR_COSIGN2_PUB)
    keys = parse_keys("upstreams.u.require_signature.keys",
                      [VECTOR_COSIGN_PUB.decode(), "keys/cosign.pub", str(tmp_path / "keys" / "cosign.pub")],
                      tmp_path)
    first, second = load_key("k", VECTOR_COSIGN_PUB).id, load_key("k", VECTOR_COSIGN2_PUB).id
    assert [k.id for k in keys] == [first, second, second]


def _pem(public) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(("value", "problem"), [
    ([], "non-empty list"),
    ("cosign.pub", "non-empty list"),
    ([""], "non-empty list"),
    (["missing.pub"], "cannot read"),
    (["-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"], "not a PEM public key"),
    ([_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())],
     "only ECDSA P-256 public keys (cosign generate-key-pair) are verified, got RSAPublicKey"),
    ([_pem(ec.generate_private_key(ec.SECP384R1()).public_key())], "got secp384r1"),
    ([_pem(ed25519.Ed25519PrivateKey.generate().public_key())], "got Ed25519PublicKey"),
])
def test_parse_keys_errors_name_the_key(tmp_path: Path, value, problem):
    with pytest.raises(ConfigError) as info:
        parse_keys("upstreams.u.require_signature.keys", value, tmp_path)
    assert info.value.key.startswith("upstreams.u.require_signature.keys")
    assert problem in info.value.problem
    assert "\n" not in str(info.value)
