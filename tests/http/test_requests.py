"""What the HTTP layer parses and answers: names, references, digests, ranges, Accept
negotiation, pagination, error bodies."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import (
    BlobUnknown,
    DigestInvalid,
    NameInvalid,
    RangeNotSatisfiable,
    RegistryError,
    TagInvalid,
)
from proxy.handlers.ranges import parse_range
from proxy.mediatypes import accepts, parse_accept, platform_child
from proxy.reference import Digest, parse_reference, validate_name
from proxy.results import paginate

SHA = "sha256:" + "ab" * 32


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "a/b/c/d/e", "my-org/my_app",
                                  "a.b/c__d", "ghcr.io/org/img", "x" * 255, "a--b/c---d"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Alpine", "a/../b", "..", "a//b", "/a", "a/", "a_", "_a",
                                  "a/.hidden", "a b", "a\x00b", "x" * 256, "a%2fb", "a:b"])
def test_invalid_names(name):
    with pytest.raises(NameInvalid):
        validate_name(name)


def test_references():
    assert parse_reference("latest") == "latest"
    assert parse_reference("v1.2_3-rc") == "v1.2_3-rc"
    assert parse_reference(SHA) == Digest("sha256", "ab" * 32)
    assert str(parse_reference("sha512:" + "0" * 128)) == "sha512:" + "0" * 128
    for bad in ("-x", ".x", "a" * 129, "a/b", "tag!"):
        with pytest.raises(TagInvalid):
            parse_reference(bad)
    for bad in ("sha256:short", "sha256:" + "AB" * 32, "md5:" + "0" * 32, "sha512:" + "0" * 64):
        with pytest.raises(DigestInvalid):
            parse_reference(bad)


@given(st.text(max_size=300))
def test_names_and_references_never_escape_the_grammar(text):
    try:
        validate_name(text)
    except NameInvalid:
        pass
    else:
        assert ".." not in text and not text.startswith("/") and "\\" not in text
    try:
        ref = parse_reference(text)
    except RegistryError as exc:
        assert exc.status == 400
    else:
        assert "/" not in str(ref)


def test_digest_of():
    assert str(Digest.of(b"")) == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 10, None),
    ("bytes=0-0", 10, (0, 1)),
    ("bytes=2-5", 10, (2, 6)),
    ("bytes=5-", 10, (5, 10)),
    ("bytes=-3", 10, (7, 10)),
    ("bytes=-30", 10, (0, 10)),
    ("bytes=8-100", 10, (8, 10)),
])
def test_ranges(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=5-2", "bytes=0-1,3-4", "bytes=-0",
                                    "items=0-1", "bytes=", "bytes=-", "bytes=a-b"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 10)
    assert info.value.status == 416
    assert info.value.headers["Content-Range"] == "bytes */10"


@given(st.text(max_size=40), st.integers(min_value=0, max_value=1 << 40))
def test_range_parser_never_crashes(header, size):
    try:
        rng = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if rng is not None:
        start, end = rng
        assert 0 <= start < end <= size


def test_accept_negotiation():
    accepted = parse_accept([
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json; q=0.5, application/vnd.oci.image.manifest.v1+json",
    ])
    assert accepted == {"application/vnd.docker.distribution.manifest.v2+json",
                        "application/vnd.oci.image.index.v1+json",
                        "application/vnd.oci.image.manifest.v1+json"}
    assert accepts(accepted, "application/vnd.oci.image.index.v1+json")
    assert not accepts(accepted, "application/vnd.docker.distribution.manifest.list.v2+json")
    assert accepts(set(), "anything/at-all")
    assert accepts(parse_accept(["application/json, */*"]), "application/vnd.oci.image.index.v1+json")


def test_platform_child():
    index = json.dumps({"manifests": [
        {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode()
    assert platform_child(index, "linux", "amd64") == "sha256:amd"
    assert platform_child(index, "windows", "amd64") is None
    assert platform_child(b"not json", "linux", "amd64") is None


def test_pagination():
    items = ["a", "b", "c", "d"]
    assert paginate(items, None, None) == (items, False)
    assert paginate(items, 2, None) == (["a", "b"], True)
    assert paginate(items, 2, "b") == (["c", "d"], False)
    assert paginate(items, 10, "d") == ([], False)


def test_error_bodies():
    err = BlobUnknown("no such blob", detail={"digest": SHA})
    assert err.status == 404
    assert json.loads(err.body()) == {"errors": [
        {"code": "BLOB_UNKNOWN", "message": "no such blob", "detail": {"digest": SHA}}]}


async def test_handler_failures_become_oci_bodies(aiohttp_client, caplog):
    """A registry error keeps its code and status; anything unexpected is logged with its
    traceback and answered as an OCI UNKNOWN body that shows no trace of it."""
    from aiohttp import web

    from proxy.errors import BlobUnknown
    from proxy.handlers.common import oci

    async def unknown(request: web.Request) -> web.StreamResponse:
        raise BlobUnknown("blob sha256:abc unknown")

    async def broken(request: web.Request) -> web.StreamResponse:
        raise ValueError("secret internals")

    app = web.Application()
    app.router.add_get("/unknown", oci(unknown))
    app.router.add_get("/broken", oci(broken))
    client = await aiohttp_client(app)
    r = await client.get("/unknown")
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    r = await client.get("/broken")
    body = await r.text()
    assert r.status == 500 and r.headers["Content-Type"] == "application/json"
    assert '"code": "UNKNOWN"' in body or '"code":"UNKNOWN"' in body
    assert "secret internals" not in body and "Traceback" not in body
    assert "secret internals" in caplog.text  # the log has it
