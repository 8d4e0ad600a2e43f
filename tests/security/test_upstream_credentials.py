"""Finding 4: upstream credentials go only to the upstream's own origin and its bound realm.

A blob GET redirected to a CDN that answers ``401 Bearer realm="http://elsewhere/token"``
made the proxy send its upstream Basic credentials to ``elsewhere`` and keep using the
token it got there.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import aiohttp
from aiohttp import web

from proxy.app import create_app
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
