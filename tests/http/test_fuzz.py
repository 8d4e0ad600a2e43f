"""Property tests: no repository name, reference, Range or Authorization header makes the
proxy answer 500 (or crash); every error is an OCI error body. Auth is on (basic and token
mode), so the inputs cross the edge middleware and then the handlers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.reference import Digest
from proxy.settings.auth import parse_auth
from proxy.storage.backend import open_filesystem
from tests.support.edge import write_htpasswd
from tests.support.proxyfix import make_config

BLOB = b"0123456789" * 100
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
GOOD = "Basic " + base64.b64encode(b"alice:pw").decode()

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Harness:
    def __init__(self, tmp: Path, mode: str) -> None:
        write_htpasswd(tmp / "htpasswd", {"alice": "pw"})
        # no failed-login budgets: the fuzzed credentials would spend them, and every later
        # request would be a 429 that never reaches the handlers under test
        auth = parse_auth({"htpasswd": "htpasswd", "anonymous_pull": ["library/*"], "mode": mode,
                           "rules": [{"users": ["alice"], "repositories": ["**"], "actions": ["*"]}],
                           "login_failures_per_address": 0, "login_failures_per_user": 0},
                          tmp)
        store, _ = open_filesystem(tmp / "data")
        asyncio.run(store.put_small(Digest.parse(BLOB_DIGEST), BLOB))
        # linked to the cached repository the requests name (the pool alone serves nobody)
        asyncio.run(store.link_blob("docker.io/library/x", Digest.parse(BLOB_DIGEST)))
        cfg = make_config(tmp / "data", {"docker.io": "http://127.0.0.1:9"}, auth=auth)
        self.loop = asyncio.new_event_loop()

        async def start() -> TestClient:
            client = TestClient(TestServer(create_app(cfg)))
            await client.start_server()
            return client

        self.client = self.loop.run_until_complete(start())
        self.token = None
        if mode == "token":
            self.token = self.loop.run_until_complete(self._token())

    async def _token(self) -> str:
        async with self.client.get("/auth/token", params={"scope": "repository:library/x:pull,push"},
                                   headers={"Authorization": GOOD}) as r:
            return (await r.json())["token"]

    def request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes, str]:
        async def go() -> tuple[int, bytes, str]:
            async with self.client.request(method, path, headers=headers, allow_redirects=False) as r:
                return r.status, await r.read(), r.headers.get("Content-Type", "")
        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module", params=["basic", "token"])
def harness(request, tmp_path_factory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp(f"fuzz-{request.param}"), request.param)
    try:
        yield h
    finally:
        h.close()


def check(status: int, body: bytes, ctype: str) -> None:
    assert status != 500 and status < 600, (status, body[:300])
    if status >= 400 and ctype.startswith("application/json") and body:  # HEAD: no body
        assert "errors" in json.loads(body)


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
name_text = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="?#"),
            min_size=1, max_size=300),
    st.from_regex(r"[a-z0-9]+([._/-][a-z0-9]+){0,8}", fullmatch=True),
    st.sampled_from(["library/alpine", "_catalog", "a/../b", "ghcr.io/x", "a//b", "A", "-a"]),
)
reference_text = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="?#/"),
            min_size=1, max_size=200),
    st.sampled_from(["latest", BLOB_DIGEST, "sha256:" + "0" * 64, "sha256:abc", "sha512:" + "a" * 128]),
)
authorization = st.one_of(
    header_text,
    st.builds(lambda b: "Basic " + base64.b64encode(b).decode(), st.binary(max_size=120)),
    st.builds(lambda s: "Bearer " + s, header_text),
    st.builds(lambda a, b, c: "Bearer " + ".".join(
        base64.urlsafe_b64encode(x).decode().rstrip("=") for x in (a, b, c)),
        st.binary(max_size=80), st.binary(max_size=200), st.binary(max_size=70)),
    st.just(GOOD),
)
range_header = st.one_of(
    header_text,
    st.builds(lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), st.integers(-5, 10**20).map(str)),
              st.one_of(st.just(""), st.integers(-5, 10**20).map(str))),
)


@SETTINGS
@given(name=name_text, reference=reference_text, auth=authorization,
       method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH"]),
       kind=st.sampled_from(["manifests", "blobs", "tags", "uploads"]))
def test_names_references_and_authorization_never_500(harness, name, reference, auth, method, kind):
    path = {"manifests": f"/v2/{quote(name, safe='/')}/manifests/{quote(reference, safe='')}",
            "blobs": f"/v2/{quote(name, safe='/')}/blobs/{quote(reference, safe='')}",
            "tags": f"/v2/{quote(name, safe='/')}/tags/list?n={quote(reference, safe='')}",
            "uploads": f"/v2/{quote(name, safe='/')}/blobs/uploads/"}[kind]
    if kind == "uploads" and method not in ("POST",):
        method = "POST"
    check(*harness.request(method, path, {"Authorization": auth}))


@SETTINGS
@given(rng=range_header, auth=st.one_of(st.just(GOOD), authorization))
def test_range_headers_never_500(harness, rng, auth):
    headers = {"Range": rng, "Authorization": auth}
    if harness.token is not None and auth == GOOD:
        headers["Authorization"] = f"Bearer {harness.token}"
    status, body, ctype = harness.request("GET", f"/v2/library/x/blobs/{BLOB_DIGEST}", headers)
    check(status, body, ctype)
    assert status in (200, 206, 401, 416), (status, rng)


@SETTINGS
@given(scope=st.lists(header_text, max_size=4), service=st.one_of(st.none(), header_text),
       auth=authorization)
def test_token_endpoint_never_500(harness, scope, service, auth):
    params = [("scope", s) for s in scope] + ([("service", service)] if service is not None else [])
    from urllib.parse import urlencode

    status, body, ctype = harness.request("GET", f"/auth/token?{urlencode(params)}",
                                          {"Authorization": auth})
    check(status, body, ctype)
    if harness.token is None:
        assert status == 404
