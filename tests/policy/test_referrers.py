"""Tag names of attached artifacts and referrers lists (proxy/policy/referrers.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import DigestInvalid, TagInvalid
from proxy.mediatypes import OCI_INDEX, OCI_MANIFEST
from proxy.policy.referrers import (
    AttachedTag,
    cosign_tag,
    filter_referrers,
    is_attached_tag,
    parse_attached_tag,
    parse_referrers_index,
    referrers_index,
    referrers_tag,
)
from proxy.reference import Digest, is_tag

HEX = "ab" * 32
SHA = Digest("sha256", HEX)
SBOM = "application/vnd.example.sbom.v1"
SIG = "application/vnd.example.signature.v1"


# The distribution spec's own table ("Referrers Tag Schema"), digests and tags as printed there.
@pytest.mark.parametrize(("digest", "tag"), [
    ("sha256:" + "a" * 64, "sha256-" + "a" * 64),
    ("sha512:" + "a" * 128, "sha512-" + "a" * 64),
    ("test+algorithm+using+algorithm+separators+and+lots+of+characters+to+excercise+overall+truncation"
     ":alsoSome=InTheEncodedSectionToShowHyphenReplacementAndLotsAndLotsOfCharactersToExcerciseEncodedTruncation",
     "test-algorithm-using-algorithm-s-alsoSome-InTheEncodedSectionToShowHyphenReplacementAndLotsAndLot"),
])
def test_referrers_tag_matches_the_spec_table(digest, tag):
    assert referrers_tag(digest) == tag
    assert is_tag(tag)


def test_referrers_tag_of_a_parsed_digest():
    assert referrers_tag(SHA) == f"sha256-{HEX}"
    assert referrers_tag(Digest.parse("sha512:" + "c" * 128)) == "sha512-" + "c" * 64


def test_referrers_tag_refuses_a_non_digest():
    for bad in ("latest", "sha256", ":abc", "sha256:a b"):
        with pytest.raises(DigestInvalid):
            referrers_tag(bad)


@pytest.mark.parametrize("kind", ["sig", "att", "sbom"])
def test_cosign_tags_round_trip(kind):
    tag = cosign_tag(SHA, kind)
    assert tag == f"sha256-{HEX}.{kind}"
    assert is_tag(tag)
    assert parse_attached_tag(tag) == AttachedTag(SHA, kind)
    assert is_attached_tag(tag)


def test_cosign_tag_defaults_to_the_signature():
    assert cosign_tag(SHA) == f"sha256-{HEX}.sig"


def test_cosign_tag_refusals():
    with pytest.raises(ValueError):
        cosign_tag(SHA, "sigs")
    with pytest.raises(TagInvalid):  # 7 + 128 + 4 characters: over the tag grammar's 128
        cosign_tag(Digest.parse("sha512:" + "0" * 128))


def test_referrers_tag_parses_back():
    assert parse_attached_tag(referrers_tag(SHA)) == AttachedTag(SHA, None)


@pytest.mark.parametrize("tag", [
    "latest", "v1.2.3", f"sha256-{HEX[:-1]}", f"sha256-{HEX}0", f"sha256-{HEX.upper()}",
    f"sha256-{HEX}.sig.sig", f"sha256-{HEX}.SIG", f"sha256-{HEX}.tar", f"sha256_{HEX}",
    "sha512-" + "a" * 64,  # truncated: the digest cannot be recovered
    f"sha256-{HEX}-sig",
])
def test_other_tags_are_not_attached_tags(tag):
    assert parse_attached_tag(tag) is None
    assert not is_attached_tag(tag)


@given(st.binary(min_size=0, max_size=64))
def test_every_sha256_digest_round_trips(data):
    digest = Digest.of(data)
    assert parse_attached_tag(referrers_tag(digest)) == AttachedTag(digest, None)
    for kind in ("sig", "att", "sbom"):
        assert parse_attached_tag(cosign_tag(digest, kind)) == AttachedTag(digest, kind)


@given(st.text(max_size=200))
def test_parse_attached_tag_never_raises(text):
    parsed = parse_attached_tag(text)
    assert parsed is None or referrers_tag(parsed.subject) == text.split(".")[0]


# --- referrers lists --------------------------------------------------------------------------

def desc(n: int, artifact_type: str | None = None, **extra) -> dict:
    d = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{n:02x}" * 32, "size": 100 + n}
    if artifact_type is not None:
        d["artifactType"] = artifact_type
    d.update(extra)
    return d


def index(*entries, **extra) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries),
                       **extra}).encode()


def test_parse_and_filter_by_artifact_type():
    entries = parse_referrers_index(index(desc(1, SBOM, annotations={"a": "b"}), desc(2, SIG),
                                          desc(3, SBOM), desc(4)))
    assert entries is not None and len(entries) == 4
    assert [e["digest"][-2:] for e in filter_referrers(entries, SBOM)] == ["01", "03"]
    assert [e["digest"][-2:] for e in filter_referrers(entries, SIG)] == ["02"]
    assert filter_referrers(entries, "application/other") == []
    assert filter_referrers(entries, None) == entries
    assert filter_referrers(entries, None) is not entries  # a copy: the caller may extend it
    assert entries[0]["annotations"] == {"a": "b"}


def test_index_without_media_type_is_accepted():
    """An index may leave out ``mediaType`` (image-spec: SHOULD, not MUST)."""
    data = json.dumps({"schemaVersion": 2, "manifests": [desc(1, SBOM)]}).encode()
    assert parse_referrers_index(data) == [desc(1, SBOM)]


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b"null", json.dumps({"schemaVersion": 1, "manifests": []}).encode(),
    json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "manifests": []}).encode(),
    json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(),
    json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}).encode(),
    b"[" * 100_000,
])
def test_not_an_index_means_no_list(data):
    assert parse_referrers_index(data) is None


@pytest.mark.parametrize("bad", [
    "x", None, 3,
    {"digest": "sha256:" + "00" * 32, "size": 1},                             # no mediaType
    {"mediaType": OCI_MANIFEST, "size": 1},                                   # no digest
    {"mediaType": OCI_MANIFEST, "digest": "sha256:short", "size": 1},
    {"mediaType": OCI_MANIFEST, "digest": "md5:" + "0" * 32, "size": 1},
    {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "00" * 32},             # no size
    {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "00" * 32, "size": -1},
    {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "00" * 32, "size": True},
    {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "00" * 32, "size": 1, "artifactType": 5},
    {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "00" * 32, "size": 1, "annotations": {"a": 1}},
    {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "00" * 32, "size": 1, "annotations": ["a"]},
    {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "00" * 32, "size": 1,
     "annotations": {"a": "x" * (65 << 10)}},
    {"mediaType": "", "digest": "sha256:" + "00" * 32, "size": 1},
])
def test_malformed_entries_are_dropped(bad):
    assert parse_referrers_index(index(desc(1, SBOM), bad, desc(2, SIG))) == [desc(1, SBOM), desc(2, SIG)]


def test_entries_are_copied_without_unknown_fields():
    entries = parse_referrers_index(index(desc(1, SBOM, urls=["http://x"], platform={"os": "linux"})))
    assert entries == [desc(1, SBOM)]


def test_too_many_referrers_is_not_a_list():
    assert parse_referrers_index(index(*[desc(1)] * 10_001)) is None
    assert len(parse_referrers_index(index(*[desc(1)] * 10_000)) or []) == 10_000


def test_referrers_index_is_an_oci_index():
    entries = [desc(1, SBOM), desc(2)]
    body = referrers_index(entries)
    assert json.loads(body) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    assert parse_referrers_index(body) == entries
    assert json.loads(referrers_index([]))["manifests"] == []
