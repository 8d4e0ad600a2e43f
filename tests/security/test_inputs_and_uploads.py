"""Issue 14, findings 10-12: client input that used to crash a handler (500 with a
traceback), manifests served with a Content-Type the pusher chose, and uploads without
limits. Every test goes through the HTTP API of a real app."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.auth.settings import parse_auth
from proxy.config import ClusterConfig
from tests.support.edge import write_htpasswd
from tests.support.proxyfix import make_config

DEAD_UPSTREAM = "http://127.0.0.1:9"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
USERS = {"bob": "bob-pw", "carol": "carol-pw"}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str) -> dict[str, str]:
    pair = f"{user}:{USERS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def auth_config(tmp_path: Path, mode: str = "basic"):
    write_htpasswd(tmp_path / "htpasswd", USERS)
    return parse_auth({"htpasswd": "htpasswd", "mode": mode, "anonymous_pull": ["library/*"],
                       "rules": [{"users": ["bob", "carol"], "repositories": ["team/*"],
                                  "actions": ["*"]}]}, tmp_path)


async def hosted_client(aiohttp_client, tmp_path: Path, **overrides) -> TestClient:
    """A proxy whose ``team/*`` repositories are hosted; the upstream is dead."""
    cfg = make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM}, hosted=("team/*",),
                      **overrides)
    return await aiohttp_client(create_app(cfg))


async def oci_error(resp) -> str:
    """The OCI error code of ``resp`` (and a check that the body is one)."""
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert body["errors"][0]["message"]
    return body["errors"][0]["code"]


async def push_blob(client: TestClient, repo: str, data: bytes) -> str:
    d = digest_of(data)
    async with client.post(f"/v2/{repo}/blobs/uploads/?digest={d}", data=data) as r:
        assert r.status == 201, await r.text()
    return d


async def raw_request(client: TestClient, request: bytes) -> tuple[int, bytes]:
    """Send bytes aiohttp's client would refuse to (non-UTF-8 header values); the status
    and the body of the answer."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- finding 11: no 500 for odd input --------------------------------------------------------

async def test_overlong_range_numbers_are_416_not_500(aiohttp_client, tmp_path):
    client = await hosted_client(aiohttp_client, tmp_path)
    d = await push_blob(client, "team/app", b"0123456789")
    huge = "9" * 4301  # past Python's int-string limit: int() raised ValueError
    for method in ("GET", "HEAD"):
        for value in (f"bytes=-{huge}", f"bytes={huge}-", f"bytes=0-{huge}", "bytes=-\u0663",
                      "bytes=\u0661-\u0662"):
            async with client.request(method, f"/v2/team/app/blobs/{d}",
                                      headers={"Range": value}) as r:
                assert r.status == 416, (method, value[:20])
                assert r.headers["Content-Range"] == "bytes */10"
                if method == "GET":
                    assert await oci_error(r) == "BLOB_UNKNOWN"
    async with client.get(f"/v2/team/app/blobs/{d}", headers={"Range": "bytes=-3"}) as r:
        assert r.status == 206 and await r.read() == b"789"  # still honoured


async def test_content_range_needs_ascii_digits(aiohttp_client, tmp_path):
    client = await hosted_client(aiohttp_client, tmp_path)
    async with client.post("/v2/team/app/blobs/uploads/") as r:
        location = r.headers["Location"]
    for value in ("0-\u00b2", "\u00b2-\u00b3", "0-\u0663", f"0-{'9' * 4301}", f"{'1' * 30}-{'2' * 30}"):
        async with client.patch(location, data=b"abc", headers={"Content-Range": value}) as r:
            assert r.status == 400, value[:20]
            assert await oci_error(r) == "BLOB_UPLOAD_INVALID"
    async with client.patch(location, data=b"abc", headers={"Content-Range": "0-2"}) as r:
        assert r.status == 202 and r.headers["Range"] == "0-2"


async def test_deeply_nested_manifest_is_manifest_invalid(aiohttp_client, tmp_path):
    client = await hosted_client(aiohttp_client, tmp_path)
    deep = b"[" * 200_000 + b"]" * 200_000
    nested = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    for body in (deep, nested):
        for ctype in (OCI_MANIFEST, "application/json"):
            async with client.put("/v2/team/app/manifests/v1", data=body,
                                  headers={"Content-Type": ctype}) as r:
                assert r.status == 400
                assert await oci_error(r) == "MANIFEST_INVALID"
    async with client.get("/v2/team/app/manifests/v1") as r:
        assert r.status == 404


async def test_deeply_nested_bearer_token_is_401_not_500(aiohttp_client, tmp_path):
    cfg = make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM}, hosted=("team/*",),
                      auth=auth_config(tmp_path, mode="token"))
    client = await aiohttp_client(create_app(cfg))
    header = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    async with client.get("/v2/team/app/tags/list",
                          headers={"Authorization": f"Bearer {header}.e30.c2ln"}) as r:
        assert r.status == 401
        assert await oci_error(r) == "UNAUTHORIZED"


async def test_non_utf8_cluster_secret_is_a_plain_404(aiohttp_client, tmp_path):
    cfg = make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM},
                      cluster=ClusterConfig(advertise_url="http://127.0.0.1:1", secret="s" * 32),
                      cache_url="redis://127.0.0.1:9/0")  # never contacted: the secret is wrong
    client = await aiohttp_client(create_app(cfg))
    path = f"/_regproxy/fills/{digest_of(b'x')}"
    status, body = await raw_request(client, (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        + b"X-Regproxy-Cluster: \xff\xfe\xc3(\r\n\r\n"))
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


@pytest.mark.parametrize("mode", ["basic", "token"])
async def test_crlf_in_a_name_never_reaches_a_header(aiohttp_client, tmp_path, mode):
    """Token mode echoes the name in the challenge's ``scope``: a CR/LF there made aiohttp
    refuse the header (500); the name is now validated before any header is built."""
    cfg = make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM}, hosted=("team/*",),
                      auth=auth_config(tmp_path, mode=mode))
    client = await aiohttp_client(create_app(cfg))
    for name in ("team/a%0d%0aSet-Cookie:%20x=1", "team/a%0aX:y", "library/a%0d%0a"):
        for method, path in (("GET", f"/v2/{name}/manifests/latest"),
                             ("PUT", f"/v2/{name}/manifests/latest"),
                             ("GET", f"/v2/{name}/tags/list")):
            async with client.request(method, path) as r:
                assert r.status == 400, (method, path)
                assert await oci_error(r) == "NAME_INVALID"
                assert "Set-Cookie" not in r.headers and "X" not in r.headers


# -- finding 12: manifests are served only as manifests ------------------------------------

async def test_manifest_push_with_a_foreign_content_type_is_refused(aiohttp_client, tmp_path):
    client = await hosted_client(aiohttp_client, tmp_path)
    config = await push_blob(client, "team/app", b'{"a":1}')
    doc = {"schemaVersion": 2,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": config, "size": 7}, "layers": []}
    plain = json.dumps(doc).encode()
    cases = [
        (plain, "text/html"),
        (plain, "text/html; charset=utf-8"),
        (plain, "application/vnd.oci.artifact.manifest.v1+json"),  # dropped from the spec
        (json.dumps({**doc, "mediaType": "text/html"}).encode(), "application/json"),
        (json.dumps({**doc, "mediaType": "text/html"}).encode(), ""),
        (json.dumps({**doc, "mediaType": "image/svg+xml"}).encode(), "text/plain"),
    ]
    for body, ctype in cases:
        async with client.put("/v2/team/app/manifests/evil", data=body,
                              headers={"Content-Type": ctype}) as r:
            assert r.status == 400, ctype
            assert await oci_error(r) == "MANIFEST_INVALID"
        async with client.get(f"/v2/team/app/manifests/{digest_of(body)}") as r:
            assert r.status == 404
    async with client.get("/v2/team/app/manifests/evil") as r:
        assert r.status == 404
    async with client.get("/v2/team/app/tags/list") as r:
        assert "evil" not in ((await r.json()).get("tags") or [])
    # a real manifest type still goes in, and comes back with it
    async with client.put("/v2/team/app/manifests/good", data=plain,
                          headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201
    async with client.get("/v2/team/app/manifests/good") as r:
        assert r.headers["Content-Type"] == OCI_MANIFEST


async def test_api_responses_have_a_sandbox_csp(aiohttp_client, tmp_path):
    client = await hosted_client(aiohttp_client, tmp_path)
    d = await push_blob(client, "team/app", b"blob")
    for path in ("/v2/", f"/v2/team/app/blobs/{d}", "/v2/team/app/manifests/nope", "/nowhere"):
        async with client.get(path) as r:
            directives = [p.strip() for p in r.headers["Content-Security-Policy"].split(";")]
            assert "sandbox" in directives, path
