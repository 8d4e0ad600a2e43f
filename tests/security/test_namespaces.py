"""Finding 2: cached and hosted repositories live in namespaces that cannot collide.

The default upstream's cached repositories used to be stored under their bare names, and
``?ns=docker.io``, ``/v2/docker.io/...`` and ``/docker.io/v2/...`` never checked the hosted
patterns: a pull-only client made the proxy overwrite a hosted repository's tag with a
same-named Docker Hub repository's, and hosted pushes were served as Docker Hub images.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from proxy.config import UpstreamConfig
from proxy.errors import NameUnknown
from proxy.layout import LAYOUT_VERSION
from proxy.routing import Namespaces
from proxy.settings.auth import parse_auth
from tests.support.edge import write_htpasswd
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import push_image
from tests.support.proxyfix import make_config
from tests.support.store import stored_tag

HOSTED = ("team/*",)


async def start(aiohttp_server, tmp_path: Path, fake: FakeUpstream, data: Path | None = None):
    upstream = await aiohttp_server(fake.app())
    write_htpasswd(tmp_path / "htpasswd", {"pusher": "pw"})
    auth = parse_auth({"htpasswd": "htpasswd", "anonymous_pull": ["**"]}, tmp_path)
    url = str(upstream.make_url("")).rstrip("/")
    cfg = make_config(data or tmp_path / "data", {"docker.io": url, "ghcr.io": url},
                      hosted=HOSTED, auth=auth)
    server = await aiohttp_server(create_app(cfg))
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def registry(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    attacker = fake.add_image("team/foo", "latest", [b"what docker.io has as team/foo"])
    base = await start(aiohttp_server, tmp_path, fake)
    headers = {"Authorization": aiohttp.encode_basic_auth("pusher", "pw")}
    async with aiohttp.ClientSession(headers=headers) as pusher:
        pushed = await push_image(pusher, base, "team/foo", "latest", [b"the team's own layer"])
    async with aiohttp.ClientSession() as anonymous:
        yield fake, base, anonymous, pushed.digest, attacker, tmp_path / "data"


@pytest.mark.parametrize("path", [
    "/v2/team/foo/manifests/latest?ns=docker.io",
    "/v2/team/foo/manifests/latest?ns=index.docker.io",
    "/v2/docker.io/team/foo/manifests/latest",
    "/docker.io/v2/team/foo/manifests/latest",
    "/v2/team/foo/tags/list?ns=docker.io",
])
async def test_a_pull_routed_upstream_never_touches_a_hosted_repository(registry, path):
    fake, base, anonymous, pushed, attacker, data = registry
    assert await stored_tag(data, "team/foo", "latest") == pushed
    async with anonymous.get(base + path) as r:
        body = await r.json()
        assert r.status == 404, body
        assert body["errors"][0]["code"] == "NAME_UNKNOWN"
        assert pushed not in str(body) and attacker not in r.headers.get("Docker-Content-Digest", "")
    assert await stored_tag(data, "team/foo", "latest") == pushed  # not rewritten with the upstream's digest
    assert not [r for r in fake.requests if "team/foo" in r.path]  # nothing asked upstream
    async with anonymous.get(f"{base}/v2/team/foo/manifests/latest") as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == pushed


async def test_cached_repositories_of_the_default_upstream_are_kept_under_its_name(registry):
    fake, base, anonymous, _pushed, _attacker, data = registry
    d = fake.add_image("library/alpine", "3", [b"alpine"])
    async with anonymous.get(f"{base}/v2/library/alpine/manifests/3") as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == d
    assert await stored_tag(data, "docker.io/library/alpine", "3") == d
    assert await stored_tag(data, "library/alpine", "3") is None
    async with anonymous.get(f"{base}/v2/_catalog") as r:  # clients still see their names
        assert (await r.json())["repositories"] == ["library/alpine", "team/foo"]


def test_a_hosted_pattern_never_captures_an_upstreams_names():
    ups = {n: UpstreamConfig(name=n, url="https://x", library_prefix=n == "docker.io")
           for n in ("docker.io", "ghcr.io")}
    names = Namespaces(ups, "docker.io", ("*/x", "team/*", "**/deep"))
    assert names.place("ghcr.io/x").upstream == "ghcr.io"  # not hosted, although */x matches
    assert names.place("ghcr.io/x").key == "ghcr.io/x"
    assert names.place("team/x").key == "team/x" and names.place("team/x").upstream is None
    assert names.place("alpine").key == "docker.io/library/alpine"
    assert names.place("alpine").name == "library/alpine"
    for name, ns in [("team/x", "docker.io"), ("docker.io/team/x", None), ("a/b/deep", "docker.io")]:
        with pytest.raises(NameUnknown):
            names.place(name, ns)
    # ?ns= with a path prefix naming the same upstream (containerd's override_path mirrors)
    assert names.place("docker.io/library/alpine", "docker.io") == names.place("alpine")
    assert names.place("ghcr.io/org/x", "ghcr.io") == names.place("ghcr.io/org/x")
    # every cached key begins with an upstream; no hosted key does
    assert names.is_cached_key("docker.io/library/alpine") and not names.is_cached_key("team/x")


async def test_a_layout_1_store_is_migrated_once_at_start_up(aiohttp_server, tmp_path):
    data = tmp_path / "data"
    d = "sha256:" + "ab" * 32
    for repo in ("library/alpine", "team/foo", "ghcr.io/org/tool", "library/alpine/nested"):
        tags = data / "repositories" / repo / "_tags"
        tags.mkdir(parents=True)
        (tags / "v1").write_text(d)
    fake = FakeUpstream()
    base = await start(aiohttp_server, tmp_path, fake, data)
    repos = data / "repositories"
    assert (repos / "docker.io" / "library" / "alpine" / "_tags" / "v1").read_text() == d
    assert (repos / "docker.io" / "library" / "alpine" / "nested" / "_tags" / "v1").read_text() == d
    assert (repos / "team" / "foo" / "_tags" / "v1").read_text() == d  # hosted: stays
    assert (repos / "ghcr.io" / "org" / "tool" / "_tags" / "v1").read_text() == d
    assert not (repos / "library").exists()
    assert (data / "layout").read_text().strip() == str(LAYOUT_VERSION)
    async with aiohttp.ClientSession() as client, client.get(f"{base}/v2/_catalog") as r:
        assert (await r.json())["repositories"] == [
            "ghcr.io/org/tool", "library/alpine", "library/alpine/nested", "team/foo"]
    # once only: a bare name appearing later (say, a hosted pattern removed) is not moved
    (repos / "other" / "_tags").mkdir(parents=True)
    await start(aiohttp_server, tmp_path, fake, data)
    assert (repos / "other" / "_tags").is_dir() and not (repos / "docker.io" / "other").exists()
