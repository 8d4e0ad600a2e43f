"""Real traffic for the console tests: images pushed to the real upstream docker-registry,
pulled through the proxy (misses, then hits), and a hosted image sharing a layer."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config import Config
from proxy.settings.prefetch import PrefetchConfig
from proxy.settings.upstreams import UpstreamConfig
from tests.support.edge import write_htpasswd
from tests.support.images import make_random_bytes, push_image, push_index
from tests.support.proxyfix import make_config

USERS = {"admin": "admin-pw", "watcher": "watcher-pw"}
#: Size of the big layer: large enough to tell cache bytes from manifest bytes.
LAYER_SIZE = 300_000


def basic(user: str) -> dict[str, str]:
    pair = f"{user}:{USERS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def auth_table(tmp_path: Path) -> dict[str, Any]:
    write_htpasswd(tmp_path / "htpasswd", USERS)
    return {"htpasswd": "htpasswd", "rules": [
        {"users": ["admin"], "repositories": ["**"], "actions": ["*"]},
        {"users": ["watcher"], "actions": ["ops"]},
    ]}


def console_config(tmp_path: Path, upstream: str, **overrides: object) -> Config:
    """``reg.io`` (the default, with a password the console must not show) and
    ``never.io`` (configured, never asked); ``team/*`` hosted; a 1 GiB budget. Layer
    prefetch is off: the tests count a first pull's layer as bytes via the upstream, which
    a prefetch racing the client would make bytes from the cache."""
    overrides.setdefault("prefetch", PrefetchConfig(enabled=False))
    cfg = make_config(tmp_path / "data", {"reg.io": upstream, "never.io": "http://127.0.0.1:9"},
                      hosted=("team/*",), max_size=1 << 30, **overrides)
    ups = dict(cfg.upstreams)
    ups["reg.io"] = replace(ups["reg.io"], username="puller", password="hunter2-secret")
    assert isinstance(ups["reg.io"], UpstreamConfig)
    return replace(cfg, upstreams=ups)


@dataclass
class Traffic:
    repo: str
    hosted: str
    image_digest: str
    big_layer: str
    shared_layer: str
    layer_size: int
    requests: int


async def make_traffic(session: aiohttp.ClientSession, upstream: str, base: str,
                       tmp_path: Path, *, headers: dict[str, str] | None = None,
                       repo: str | None = None) -> Traffic:
    """Push to the upstream, pull through the proxy twice, push a hosted image."""
    repo = repo or f"it/console-{os.urandom(3).hex()}"
    shared = make_random_bytes(4000, seed=int.from_bytes(os.urandom(4), "big"))
    big = make_random_bytes(LAYER_SIZE, seed=int.from_bytes(os.urandom(4), "big"))
    image = await push_image(session, upstream, repo, "v1", [shared, big], schema="oci")
    arm = await push_image(session, upstream, repo, None, [make_random_bytes(1000, seed=7)],
                           schema="oci", platform=("linux", "arm64"))
    amd = await push_image(session, upstream, repo, None, [make_random_bytes(1000, seed=8)],
                           schema="oci", platform=("linux", "amd64"))
    await push_index(session, upstream, repo, "multi", [amd, arm])
    h = headers or {}
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json, "
                        "application/vnd.oci.image.index.v1+json"}
    requests = 0
    for _ in range(2):  # a miss, then hits
        async with session.get(f"{base}/v2/{repo}/manifests/v1", headers={**h, **accept}) as r:
            assert r.status == 200, await r.text()
        for layer in image.layers:
            async with session.get(f"{base}/v2/{repo}/blobs/{layer.digest}", headers=h) as r:
                assert r.status == 200 and len(await r.read()) == layer.size
        requests += 3
    async with session.get(f"{base}/v2/{repo}/manifests/multi", headers={**h, **accept}) as r:
        assert r.status == 200, await r.text()
    for child in (amd, arm):
        async with session.get(f"{base}/v2/{repo}/manifests/{child.digest}",
                               headers={**h, **accept}) as r:
            assert r.status == 200, await r.text()
    requests += 3
    hosted = "team/app"
    async with aiohttp.ClientSession(headers=h) as pusher:
        await push_image(pusher, base, hosted, "latest", [shared], schema="oci")
    return Traffic(repo=repo, hosted=hosted, image_digest=image.digest,
                   big_layer=image.layers[1].digest, shared_layer=image.layers[0].digest,
                   layer_size=LAYER_SIZE, requests=requests)
