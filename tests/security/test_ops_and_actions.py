"""Issue 14, finding 8: the delete right decided from the matched route, not the path text."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp

from proxy.app import create_app
from proxy.auth.settings import parse_auth
from tests.support.edge import write_htpasswd
from tests.support.fake_upstream import digest_of
from tests.support.proxyfix import make_config

UPSTREAM = "http://127.0.0.1:9"  # nothing listens there; shown on the status page
USERS = {"admin": "admin-pw", "alice": "alice-pw"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: A hosted repository whose name contains the text the old code looked for.
TRAP = "team/blobs/uploads/app"


def basic(user: str) -> dict[str, str]:
    pair = f"{user}:{USERS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def auth_table(tmp_path: Path, **extra: object) -> dict:
    write_htpasswd(tmp_path / "htpasswd", USERS)
    table = {
        "htpasswd": "htpasswd",
        "anonymous_pull": ["library/*"],
        "rules": [
            {"users": ["admin"], "repositories": ["team/**"], "actions": ["*"]},
            {"users": ["alice"], "repositories": ["team/**"], "actions": ["pull", "push"]},
        ],
    }
    table.update(extra)
    return table


def config(tmp_path: Path, *, auth: bool = True, **overrides: object):
    parsed = parse_auth(auth_table(tmp_path), tmp_path) if auth else None
    return make_config(tmp_path / "data", {"docker.io": UPSTREAM}, hosted=("team/**",),
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
