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
from proxy.config import ClusterConfig, ConfigError, from_dict
from proxy.settings.auth import parse_auth
from tests.support.edge import write_htpasswd
from tests.support.fake_upstream import FakeUpstream
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


# -- finding 10: limits on uploads -----------------------------------------------------------

async def test_open_upload_sessions_are_capped_per_repository(aiohttp_client, tmp_path):
    client = await hosted_client(aiohttp_client, tmp_path, max_uploads_per_repository=3)
    locations = []
    for _ in range(3):
        async with client.post("/v2/team/app/blobs/uploads/") as r:
            assert r.status == 202
            locations.append(r.headers["Location"])
    for path in ("/v2/team/app/blobs/uploads/",
                 f"/v2/team/app/blobs/uploads/?digest={digest_of(b'x')}"):
        async with client.post(path, data=b"x") as r:
            assert r.status == 429
            assert await oci_error(r) == "TOOMANYREQUESTS"
            assert "team/app" in (await r.json())["errors"][0]["message"]
    async with client.post("/v2/team/other/blobs/uploads/") as r:
        assert r.status == 202  # another repository has its own budget
    async with client.delete(locations[0]) as r:
        assert r.status == 204
    async with client.post("/v2/team/app/blobs/uploads/") as r:
        assert r.status == 202  # a closed session frees its slot
    async with client.put(f"{locations[1]}?digest={digest_of(b'')}") as r:
        assert r.status == 201
    await push_blob(client, "team/app", b"a whole blob")  # so does a completed one


async def test_open_upload_sessions_are_capped_per_user(aiohttp_client, tmp_path):
    cfg = make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM}, hosted=("team/*",),
                      auth=auth_config(tmp_path), max_uploads_per_user=2)
    client = await aiohttp_client(create_app(cfg))
    for repo in ("team/a", "team/b"):
        async with client.post(f"/v2/{repo}/blobs/uploads/", headers=basic("bob")) as r:
            assert r.status == 202
    async with client.post("/v2/team/c/blobs/uploads/", headers=basic("bob")) as r:
        assert r.status == 429
        assert await oci_error(r) == "TOOMANYREQUESTS"
    async with client.post("/v2/team/c/blobs/uploads/", headers=basic("carol")) as r:
        assert r.status == 202  # the cap is bob's, not the registry's


async def test_upload_sessions_are_capped_per_address_without_auth(aiohttp_client, tmp_path):
    client = await hosted_client(aiohttp_client, tmp_path, max_uploads_per_user=2)
    for repo in ("team/a", "team/b"):
        async with client.post(f"/v2/{repo}/blobs/uploads/") as r:
            assert r.status == 202
    async with client.post("/v2/team/c/blobs/uploads/") as r:
        assert r.status == 429 and await oci_error(r) == "TOOMANYREQUESTS"


async def test_uploads_refused_below_the_free_space_watermark(aiohttp_client, tmp_path):
    roomy = await hosted_client(aiohttp_client, tmp_path)
    async with roomy.post("/v2/team/app/blobs/uploads/") as r:
        location = r.headers["Location"]
    # the same store, restarted with a watermark no disk can satisfy
    full = await hosted_client(aiohttp_client, tmp_path, min_free=1 << 60)
    for path in ("/v2/team/app/blobs/uploads/",
                 f"/v2/team/app/blobs/uploads/?digest={digest_of(b'x')}"):
        async with full.post(path, data=b"x") as r:
            assert r.status == 507
            assert await oci_error(r) == "UNAVAILABLE"
            assert "storage.min_free" in (await r.json())["errors"][0]["message"]
    async with full.patch(location, data=b"chunk", headers={"Content-Range": "0-4"}) as r:
        assert r.status == 507 and await oci_error(r) == "UNAVAILABLE"
    async with full.get(location) as r:
        assert r.status == 204 and r.headers["Range"] == "0-0"  # nothing was written


async def test_fills_refused_below_the_free_space_watermark(aiohttp_client, aiohttp_server,
                                                            tmp_path):
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3", [b"layer one"])
    up = await aiohttp_server(fake.app())
    cfg = make_config(tmp_path / "data", {"docker.io": str(up.make_url("")).rstrip("/")},
                      min_free=1 << 60)
    client = await aiohttp_client(create_app(cfg))
    async with client.get("/v2/library/alpine/manifests/3",
                          headers={"Accept": OCI_MANIFEST}) as r:
        assert r.status == 200  # manifests are small: still cached and served
    layer = digest_of(b"layer one")
    async with client.get(f"/v2/library/alpine/blobs/{layer}") as r:
        assert r.status == 503  # clients fall back to the upstream
        assert await oci_error(r) == "UNAVAILABLE"
        assert "storage.min_free" in (await r.json())["errors"][0]["message"]
    assert not any(req.method == "GET" and layer in req.path for req in fake.requests)


async def test_free_space_watermark_as_a_percentage(aiohttp_client, tmp_path):
    full = await hosted_client(aiohttp_client, tmp_path, min_free_percent=100.0)
    async with full.post("/v2/team/app/blobs/uploads/") as r:
        assert r.status == 507
    roomy = await hosted_client(aiohttp_client, tmp_path / "other", min_free_percent=0.0)
    async with roomy.post("/v2/team/app/blobs/uploads/") as r:
        assert r.status == 202


def test_limit_keys_in_the_config_file(tmp_path):
    cfg = from_dict({"hosted": {"max_uploads_per_repository": 8, "max_uploads_per_user": 0},
                     "storage": {"min_free": "5%"}}, tmp_path)
    assert (cfg.max_uploads_per_repository, cfg.max_uploads_per_user) == (8, 0)
    assert (cfg.min_free, cfg.min_free_percent) == (0, 5.0)
    cfg = from_dict({"storage": {"min_free": "2GiB"}}, tmp_path)
    assert (cfg.min_free, cfg.min_free_percent) == (2 << 30, 0.0)
    defaults = from_dict({}, tmp_path)
    assert defaults.min_free == 1 << 30
    assert (defaults.max_uploads_per_repository, defaults.max_uploads_per_user) == (64, 256)
    for bad in ({"storage": {"min_free": "120%"}}, {"storage": {"min_free": "lots"}},
                {"hosted": {"max_uploads_per_user": -1}}):
        with pytest.raises(ConfigError):
            from_dict(bad, tmp_path)
