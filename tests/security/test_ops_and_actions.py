"""Issue 14, findings 6 and 8: who may see the operational pages (the ``ops`` right, the
debug listener), and the delete right decided from the matched route, not the path text."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from proxy.auth.access import AccessControl
from proxy.config import ConfigError, from_dict
from proxy.debuglisten import DEBUG_ADDRESS
from proxy.envconfig import apply_env
from proxy.server import runner_kwargs
from proxy.settings.auth import parse_auth
from tests.support.edge import EdgeProxy, write_htpasswd
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.proxyfix import make_config
from tests.support.registry import free_port

UPSTREAM = "http://127.0.0.1:9"  # nothing listens there; shown on the status page
USERS = {"admin": "admin-pw", "alice": "alice-pw", "watcher": "watcher-pw"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: A hosted repository whose name contains the text the old code looked for.
TRAP = "team/blobs/uploads/app"
SECRET = "private/secret-project"  # a cached repository only admin may pull
OPS_PAGES = ("/", "/status", "/status.json", "/metrics")


def basic(user: str) -> dict[str, str]:
    pair = f"{user}:{USERS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def auth_table(tmp_path: Path, **extra: object) -> dict:
    write_htpasswd(tmp_path / "htpasswd", USERS)
    table = {
        "htpasswd": "htpasswd",
        "anonymous_pull": ["library/*"],
        "rules": [
            {"users": ["admin"], "repositories": ["team/**", "private/**"], "actions": ["*"]},
            {"users": ["alice"], "repositories": ["team/**"], "actions": ["pull", "push"]},
            {"users": ["watcher"], "actions": ["ops"]},
        ],
    }
    table.update(extra)
    return table


def config(tmp_path: Path, *, auth: bool = True, upstream: str = UPSTREAM, **overrides: object):
    parsed = parse_auth(auth_table(tmp_path), tmp_path) if auth else None
    return make_config(tmp_path / "data", {"docker.io": upstream}, hosted=("team/**",),
                       auth=parsed, **overrides)


async def error_code(resp: aiohttp.ClientResponse) -> str:
    return (await resp.json())["errors"][0]["code"]


async def push_image(client, repo: str, headers: dict[str, str]) -> tuple[str, str]:
    """Push a one-layer image; (manifest digest, layer digest)."""
    blobs = [b'{"config": true}', b"layer bytes of " + repo.encode()]
    for blob in blobs:
        async with client.post(f"/v2/{repo}/blobs/uploads/?digest={digest_of(blob)}",
                               data=blob, headers=headers) as r:
            assert r.status == 201, await r.text()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(blobs[0]), "size": len(blobs[0])},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest_of(blobs[1]), "size": len(blobs[1])}],
    }).encode()
    async with client.put(f"/v2/{repo}/manifests/v1", data=manifest,
                          headers={**headers, "Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201, await r.text()
        return r.headers["Docker-Content-Digest"], digest_of(blobs[1])


# -- finding 8: the delete right -------------------------------------------------------------

async def test_delete_right_comes_from_the_route_not_the_path_text(aiohttp_client, tmp_path):
    client = await aiohttp_client(create_app(config(tmp_path)))
    manifest, layer = await push_image(client, TRAP, basic("admin"))
    # alice may pull and push team/** but not delete: the "/blobs/uploads/" inside the
    # repository name used to make these DELETEs count as cancelling an upload (push)
    for path in (f"/v2/{TRAP}/manifests/{manifest}", f"/v2/{TRAP}/manifests/v1",
                 f"/v2/{TRAP}/blobs/{layer}", f"/docker.io/v2/{TRAP}/manifests/{manifest}"):
        async with client.delete(path, headers=basic("alice")) as r:
            assert r.status == 403, (path, await r.text())
            assert await error_code(r) == "DENIED"
    async with client.get(f"/v2/{TRAP}/manifests/v1", headers=basic("alice")) as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == manifest
    async with client.get(f"/v2/{TRAP}/blobs/{layer}", headers=basic("alice")) as r:
        assert r.status == 200
    # cancelling an upload is still push, in that repository too
    async with client.post(f"/v2/{TRAP}/blobs/uploads/", headers=basic("alice")) as r:
        assert r.status == 202
        location = r.headers["Location"]
    async with client.delete(location, headers=basic("alice")) as r:
        assert r.status == 204, await r.text()
    # and the delete right still deletes
    async with client.delete(f"/v2/{TRAP}/manifests/{manifest}", headers=basic("admin")) as r:
        assert r.status == 202, await r.text()


# -- finding 6: status, metrics, the ops right -----------------------------------------------

async def test_ops_pages_need_the_ops_right(aiohttp_client, aiohttp_server, tmp_path):
    fake = FakeUpstream()
    upstream = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    fake.add_image(SECRET, "v1", [b"private layer"])
    cfg = config(tmp_path, upstream=upstream)
    # with the access-log hook, which feeds the status page's figures
    client = await aiohttp_client(await aiohttp_server(create_app(cfg), **runner_kwargs(cfg)))
    async with client.get(f"/v2/{SECRET}/manifests/v1", headers=basic("admin")) as r:
        layer = (await r.json())["layers"][0]["digest"]
    async with client.get(f"/v2/{SECRET}/blobs/{layer}", headers=basic("admin")) as r:
        assert await r.read() == b"private layer"  # counted in the top repositories
    for path in OPS_PAGES:
        for method in ("GET", "HEAD"):
            async with client.request(method, path) as r:  # anonymous: a login prompt
                assert r.status == 401, (method, path)
                assert r.headers["WWW-Authenticate"].startswith("Basic realm=")
                if method == "GET":
                    assert await error_code(r) == "UNAUTHORIZED"
        for user in ("alice", "admin"):  # repository rights are not the ops right
            async with client.get(path, headers=basic(user)) as r:
                body = await r.text()
                assert r.status == 403, (user, path)
                assert json.loads(body)["errors"][0]["code"] == "DENIED"
                assert SECRET not in body and upstream not in body
        async with client.get(path, headers={"Authorization": "Basic "
                                             + base64.b64encode(b"watcher:wrong").decode()}) as r:
            assert r.status == 401
    for path in ("/status", "/status.json", "/"):
        async with client.get(path, headers=basic("watcher")) as r:
            body = await r.text()
            assert r.status == 200, path
            assert SECRET in body and upstream in body
    async with client.get("/metrics", headers=basic("watcher")) as r:
        assert r.status == 200 and "regproxy_requests_total" in await r.text()
    for path in ("/healthz", "/readyz"):  # probes stay open
        async with client.get(path) as r:
            assert r.status == 200, path


async def test_ops_right_with_bearer_tokens_and_without_rules(aiohttp_client, tmp_path):
    auth = parse_auth(auth_table(tmp_path, mode="token", token_key="token.key"), tmp_path)
    client = await aiohttp_client(create_app(replace(config(tmp_path), auth=auth)))
    # token mode still prompts browsers and scrapers with Basic on these pages
    async with client.get("/status.json") as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
    tokens = {}
    for user in ("watcher", "alice"):
        async with client.get("/auth/token", params={"service": "regproxy"},
                              headers=basic(user)) as r:
            tokens[user] = (await r.json())["token"]
    async with client.get("/status.json", headers={"Authorization": f"Bearer {tokens['watcher']}"}) as r:
        assert r.status == 200
    async with client.get("/status.json", headers={"Authorization": f"Bearer {tokens['alice']}"}) as r:
        assert r.status == 403 and await error_code(r) == "DENIED"
    # without [[auth.rules]] every signed-in user may do everything, ops included;
    # anonymous clients never
    open_rules = parse_auth(auth_table(tmp_path, rules=[]), tmp_path)
    client2 = await aiohttp_client(create_app(replace(config(tmp_path), auth=open_rules)))
    async with client2.get("/status.json", headers=basic("alice")) as r:
        assert r.status == 200
    async with client2.get("/status.json") as r:
        assert r.status == 401


async def test_open_registry_keeps_open_ops_pages(aiohttp_client, tmp_path):
    client = await aiohttp_client(create_app(config(tmp_path, auth=False)))
    for path in (*OPS_PAGES, "/healthz", "/readyz"):
        async with client.get(path) as r:
            assert r.status == 200, path


async def test_debug_listener_serves_ops_pages_without_auth(aiohttp_client, tmp_path):
    app = create_app(config(tmp_path, debug_listen=("127.0.0.1", 0)))
    client = await aiohttp_client(app)
    # the main listener no longer has the pages (404), even for the ops user; probes stay
    for path in OPS_PAGES:
        async with client.get(path, headers=basic("watcher")) as r:
            assert r.status == 404, path
            assert await error_code(r) == "NOT_FOUND"
    async with client.get("/healthz") as r:
        assert r.status == 200
    host, port = app[DEBUG_ADDRESS]
    base = f"http://{host}:{port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/status", "/status.json", "/metrics", "/healthz", "/readyz"):
            async with session.get(base + path) as r:
                assert r.status == 200, path
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with session.get(base + "/status.json") as r:
            assert (await r.json())["upstreams"][0]["url"] == UPSTREAM
        # nothing else: not the registry API, not the token endpoint
        for path in ("/", "/v2/", f"/v2/{SECRET}/tags/list", "/auth/token"):
            async with session.get(base + path) as r:
                assert r.status == 404, path
                assert await error_code(r) == "NOT_FOUND"
    await client.close()
    with pytest.raises(aiohttp.ClientConnectionError):  # closed with the application
        async with aiohttp.ClientSession() as session, session.get(base + "/healthz") as r:
            pass


def _fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def test_serve_with_workers_and_a_debug_listener(tmp_path):
    write_htpasswd(tmp_path / "htpasswd", USERS)
    debug = free_port()
    (tmp_path / "config.toml").write_text(f"""
[server]
debug_listen = "127.0.0.1:{debug}"
workers = 2
[storage]
root = "data"
[upstreams."docker.io"]
url = "{UPSTREAM}"
[auth]
htpasswd = "htpasswd"
""")
    proxy = EdgeProxy(tmp_path / "run", tmp_path / "config.toml", tls=False)
    await asyncio.to_thread(proxy.start)
    try:
        status, body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{debug}/status.json")
        assert status == 200 and json.loads(body)["upstreams"][0]["url"] == UPSTREAM
        # every worker binds the debug port (SO_REUSEPORT): several pids answer
        pids: set[int] = set()
        for _ in range(40):
            _, body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{debug}/status.json")
            pids.add(json.loads(body)["pid"])
            if len(pids) > 1:
                break
        assert len(pids) == 2, pids
        status, _ = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{debug}/metrics")
        assert status == 200
        status, _ = await asyncio.to_thread(_fetch, f"{proxy.url}/status.json")
        assert status == 404
        status, _ = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{debug}/v2/")
        assert status == 404
    finally:
        await asyncio.to_thread(proxy.stop)


# -- configuration ---------------------------------------------------------------------------

def test_ops_rules_and_debug_listen_config(tmp_path):
    write_htpasswd(tmp_path / "htpasswd", USERS)
    acl = AccessControl(parse_auth(auth_table(tmp_path), tmp_path))
    assert acl.may_operate("watcher") and not acl.may_operate("admin")  # "*" is not ops
    assert not acl.may_operate(None)
    assert "ops" not in acl.actions("watcher", "team/x", None)
    assert acl.actions("admin", "team/x", None) == {"pull", "push", "delete"}
    for rule, problem in (
        ({"users": ["a"], "repositories": ["x/*"], "actions": ["fly"]}, "ops"),
        ({"users": ["a"], "repositories": ["x/*"], "actions": ["pull", "ops"]}, "not per-repository"),
        ({"users": ["a"], "actions": ["pull"]}, "missing"),
    ):
        with pytest.raises(ConfigError, match=problem):
            parse_auth({"htpasswd": "htpasswd", "rules": [rule]}, tmp_path)
    cfg = from_dict({"server": {"debug_listen": "0.0.0.0:5001"}})
    assert cfg.debug_listen == ("0.0.0.0", 5001)
    assert from_dict({}).debug_listen is None
    assert from_dict(apply_env({}, {"REGISTRY_HTTP_DEBUG_ADDR": ":5001"})).debug_listen == ("0.0.0.0", 5001)
    with pytest.raises(ConfigError, match=r"server\.debug_listen"):
        from_dict({"server": {"debug_listen": "nowhere"}})
    with pytest.raises(ConfigError, match=r"server\.debug_listen"):
        from_dict({"server": {"debug_listen": "127.0.0.1:5000"}})  # the main port
    with pytest.raises(ConfigError, match=r"server\.debug_listen"):
        from_dict({"server": {"debug_listen": "127.0.0.1:0", "workers": 2}})
