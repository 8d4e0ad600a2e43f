"""Finding 4: upstream credentials go only to the upstream's own origin and its bound realm.

A blob GET redirected to a CDN that answers ``401 Bearer realm="http://elsewhere/token"``
made the proxy send its upstream Basic credentials to ``elsewhere`` and keep using the
token it got there.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import create_app
from proxy.upstream.urls import same_origin
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import make_config

CREDS = "robot:s3cret"


class Catcher:
    """A token endpoint that should never be asked: records what reaches it."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()

        async def token(request: web.Request) -> web.Response:
            self.seen.append(dict(request.headers))
            return web.json_response({"token": "evil-token", "expires_in": 300})

        app.router.add_get("/token", token)
        return app


async def challenger(aiohttp_server, path: str, realm: str) -> str:
    """A server answering every GET of ``path`` with a Bearer challenge naming ``realm``."""
    async def challenge(request: web.Request) -> web.Response:
        return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "x"}]},
                                 status=401,
                                 headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'})

    app = web.Application()
    app.router.add_get(path, challenge)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


async def test_a_redirect_targets_challenge_gets_no_credentials(aiohttp_server, tmp_path):
    catcher = Catcher()
    catcher_url = str((await aiohttp_server(catcher.app())).make_url("")).rstrip("/")
    # all on 127.0.0.1: the realm passes the host rule, so only the origin rule stops it
    realm = f"{catcher_url}/token"
    fake = FakeUpstream(require_basic=CREDS)
    fake.redirect_to = await challenger(aiohttp_server, "/cdn/{digest}", realm)
    blob = b"layer bytes" * 100
    fake.add_image("private/app", "v1", [blob])
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cfg = make_config(tmp_path / "d", {"basic.io": up})
    user, password = CREDS.split(":")
    cfg = replace(cfg, upstreams={"basic.io": replace(cfg.upstreams["basic.io"], username=user,
                                                      password=password)})
    base = str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/v2/private/app/manifests/v1") as r:
            assert r.status == 200
            layer = (await r.json())["layers"][0]["digest"]
        async with client.get(f"{base}/v2/private/app/blobs/{layer}") as r:
            assert r.status in (404, 502, 503)  # the CDN refused: not served, not a 500
        async with client.get(f"{base}/v2/private/app/manifests/v1") as r:
            assert r.status == 200  # the upstream still gets its own Basic credentials
    assert catcher.seen == []
    expected = "Basic " + base64.b64encode(CREDS.encode()).decode()
    sent = [r.headers.get("Authorization") for r in fake.requests]
    assert expected in sent and set(sent) <= {None, expected}, sent  # never the CDN's token


async def test_a_plain_http_realm_on_another_host_gets_no_credentials(aiohttp_server, tmp_path):
    """The upstream itself names an http realm elsewhere: refused (https or its own host)."""
    catcher = Catcher()
    catcher_app = catcher.app()
    catcher_server = await aiohttp_server(catcher_app)
    realm = str(catcher_server.make_url("/token")).replace("127.0.0.1", "localhost")
    up = await challenger(aiohttp_server, "/v2/{name:.+}/manifests/{ref}", realm)
    cfg = make_config(tmp_path / "d", {"x.io": up})
    user, password = CREDS.split(":")
    cfg = replace(cfg, upstreams={"x.io": replace(cfg.upstreams["x.io"], username=user,
                                                  password=password)})
    base = str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as client, \
            client.get(f"{base}/v2/app/manifests/v1") as r:
        assert r.status == 404
    assert catcher.seen == []


async def proxy_for(aiohttp_server, tmp_path, up: str) -> str:
    """A proxy whose one upstream ``x.io`` is ``up``, with ``CREDS`` configured for it."""
    cfg = make_config(tmp_path / "d", {"x.io": up})
    user, password = CREDS.split(":")
    cfg = replace(cfg, upstreams={"x.io": replace(cfg.upstreams["x.io"], username=user,
                                                  password=password)})
    return str((await aiohttp_server(create_app(cfg))).make_url("")).rstrip("/")


async def test_an_http_realm_on_the_upstreams_host_but_another_port_gets_no_credentials(
        aiohttp_server, tmp_path, caplog):
    """Same scheme and host, another port (another service on the upstream's machine, or
    one an attacker opened there): not the upstream's origin, so no cleartext credentials."""
    caplog.set_level(logging.WARNING, logger="regproxy.upstream")
    catcher = Catcher()
    realm = str((await aiohttp_server(catcher.app())).make_url("/token"))
    up = await challenger(aiohttp_server, "/v2/{name:.+}/manifests/{ref}", realm)
    assert URL(realm).host == URL(up).host and URL(realm).port != URL(up).port
    base = await proxy_for(aiohttp_server, tmp_path, up)
    async with aiohttp.ClientSession() as client, \
            client.get(f"{base}/v2/app/manifests/v1") as r:
        assert r.status == 404  # the upstream's 401, mapped as ever: clients fall back
        assert "denied" in (await r.json())["errors"][0]["message"]
    assert catcher.seen == []  # never asked at all, so never given an Authorization
    assert "ignoring a token realm" in caplog.text


async def test_an_http_realm_on_the_upstreams_own_origin_gets_the_credentials(
        aiohttp_server, tmp_path):
    """A local registry with its token service on its own origin keeps working."""
    fake = FakeUpstream(require_token="local-token")  # realm: http://<its host:port>/token
    d = fake.add_image("app", "v1", [b"layer"])
    base = await proxy_for(aiohttp_server, tmp_path,
                           str((await aiohttp_server(fake.app())).make_url("")).rstrip("/"))
    async with aiohttp.ClientSession() as client, \
            client.get(f"{base}/v2/app/manifests/v1") as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == d
    expected = "Basic " + base64.b64encode(CREDS.encode()).decode()
    assert [x.headers.get("Authorization") for x in fake.requests if x.path == "/token"] == [expected]
    assert any(x.headers.get("Authorization") == "Bearer local-token"
               for x in fake.requests if "/manifests/" in x.path)


@pytest.mark.parametrize(("a", "b", "same"), [
    ("http://registry.internal/v2/x", "http://registry.internal:80/token", True),
    ("https://Registry.Internal", "https://registry.internal:443/token", True),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/token?x=1", True),
    ("http://127.0.0.1:5000", "http://127.0.0.1:6666/token", False),
    ("http://registry.internal", "http://registry.internal:8080/token", False),
    ("http://registry.internal", "https://registry.internal/token", False),
    ("https://registry.internal:443", "http://registry.internal:443/token", False),
    ("http://registry.internal", "/token", False),
])
def test_same_origin_compares_the_effective_port(a, b, same):
    assert same_origin(URL(a), URL(b)) is same and same_origin(URL(b), URL(a)) is same


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
@pytest.mark.parametrize("cdn_on_own_origin", [True, False])
async def test_a_redirect_carries_credentials_only_to_the_same_origin(
        aiohttp_server, tmp_path, scheme, cdn_on_own_origin):
    """A blob GET redirected to the upstream's own origin keeps its Authorization; one to
    another port of the same host (another origin) gets none, Basic or Bearer."""
    fake = (FakeUpstream(require_basic=CREDS) if scheme == "basic"
            else FakeUpstream(require_token="blob-token"))
    blob = b"redirected layer" * 64
    d = fake.add_blob(blob)
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    cdn = fake if cdn_on_own_origin else FakeUpstream()
    cdn.add_blob(blob)
    fake.redirect_to = up if cdn_on_own_origin else str(
        (await aiohttp_server(cdn.app())).make_url("")).rstrip("/")
    base = await proxy_for(aiohttp_server, tmp_path, up)
    async with aiohttp.ClientSession() as client, client.get(f"{base}/v2/app/blobs/{d}") as r:
        assert r.status == 200 and await r.read() == blob
    sent = ("Basic " + base64.b64encode(CREDS.encode()).decode() if scheme == "basic"
            else "Bearer blob-token")
    at_cdn = {x.headers.get("Authorization") for x in cdn.requests if x.path.startswith("/cdn/")}
    assert at_cdn == ({sent} if cdn_on_own_origin else {None})
