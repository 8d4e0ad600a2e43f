"""Finding 1: a repository serves only the objects linked to it.

The store is one content-addressed pool. On a cached route, ``GET``/``HEAD`` of a blob or a
manifest by digest used to answer from the pool whether or not that repository ever held
the object: anyone allowed to pull ``library/*`` read private hosted content (and other
upstreams' content) by digest, HEAD was an existence oracle, and a mount copied it into a
writable repository.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.config import Config
from proxy.settings.auth import parse_auth
from tests.support.edge import write_htpasswd
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.images import push_blob, push_image
from tests.support.proxyfix import make_config
from tests.support.store import wait_stored

PUSHER = {"Authorization": aiohttp.encode_basic_auth("pusher", "pw")}
RULES = {
    "htpasswd": "htpasswd",
    "anonymous_pull": ["library/*", "ghcr.io/**"],
    "rules": [{"users": ["pusher"], "repositories": ["private/*", "team/*", "library/*"],
               "actions": ["pull", "push"]}],
}


def config(tmp_path: Path, upstreams: dict[str, str]) -> Config:
    write_htpasswd(tmp_path / "htpasswd", {"pusher": "pw"})
    return make_config(tmp_path / "data", upstreams, hosted=("private/*", "team/*"),
                       auth=parse_auth(RULES, tmp_path))


@dataclass
class Env:
    hub: FakeUpstream
    ghcr: FakeUpstream
    base: str
    anonymous: aiohttp.ClientSession
    pusher: aiohttp.ClientSession


async def start(aiohttp_server, tmp_path: Path):
    hub, ghcr = FakeUpstream(blob_repos={}), FakeUpstream(blob_repos={})
    urls = {}
    for name, fake in (("docker.io", hub), ("ghcr.io", ghcr)):
        urls[name] = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    server = await aiohttp_server(create_app(config(tmp_path, urls)))
    return hub, ghcr, str(server.make_url("")).rstrip("/")


def add_image(fake: FakeUpstream, repo: str, tag: str, layers: list[bytes]) -> str:
    digest = fake.add_image(repo, tag, layers)
    doc = json.loads(fake.manifests[(repo, tag)][0])
    for desc in [doc["config"], *doc["layers"]]:
        assert fake.blob_repos is not None
        fake.blob_repos.setdefault(desc["digest"], set()).add(repo)
    return digest


async def env_of(aiohttp_server, tmp_path):
    hub, ghcr, base = await start(aiohttp_server, tmp_path)
    anonymous = aiohttp.ClientSession()
    pusher = aiohttp.ClientSession(headers=PUSHER)
    return Env(hub, ghcr, base, anonymous, pusher)


async def status_and_body(session: aiohttp.ClientSession, method: str, url: str):
    async with session.request(method, url) as r:
        return r.status, await r.read()


async def test_a_private_blob_is_not_read_through_a_cached_route(aiohttp_server, tmp_path):
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        secret = b"private bytes " + os.urandom(64)
        pushed = await push_image(env.pusher, env.base, "private/secret", "v1", [secret])
        layer = pushed.layers[0].digest
        for repo in ("library/alpine", "library/zzz"):  # a real one, and one that does not exist
            add_image(env.hub, "library/alpine", "3", [b"alpine"])
            for method in ("GET", "HEAD"):
                status, body = await status_and_body(
                    env.anonymous, method, f"{env.base}/v2/{repo}/blobs/{layer}")
                assert status == 404 and secret not in body
                if method == "GET":
                    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        # the private manifest by digest, too
        status, body = await status_and_body(
            env.anonymous, "GET", f"{env.base}/v2/library/alpine/manifests/{pushed.digest}")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        # the owner still reads it
        status, body = await status_and_body(
            env.pusher, "GET", f"{env.base}/v2/private/secret/blobs/{layer}")
        assert status == 200 and body == secret


async def test_head_is_no_existence_oracle(aiohttp_server, tmp_path):
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        stored = (await push_blob(env.pusher, env.base, "private/secret", b"stored")).digest
        absent = digest_of(b"never stored anywhere")
        answers = []
        for digest in (stored, absent):
            async with env.anonymous.head(f"{env.base}/v2/library/x/blobs/{digest}") as r:
                answers.append((r.status, r.headers.get("Content-Length")))
            async with env.anonymous.get(f"{env.base}/v2/library/x/blobs/{digest}") as r:
                answers.append((r.status, (await r.json())["errors"][0]["code"]))
        assert answers[:2] == answers[2:] == [(404, answers[0][1]), (404, "BLOB_UNKNOWN")]


async def test_a_mount_needs_the_blob_linked_in_its_source(aiohttp_server, tmp_path):
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        secret = (await push_blob(env.pusher, env.base, "private/secret", b"mount me")).digest
        url = f"{env.base}/v2/team/x/blobs/uploads/?mount={secret}&from=library/zzz"
        async with env.pusher.post(url) as r:
            assert r.status == 202  # a plain upload: the source does not hold the blob
            await env.pusher.delete(env.base + r.headers["Location"])
        status, _ = await status_and_body(env.pusher, "GET", f"{env.base}/v2/team/x/blobs/{secret}")
        assert status == 404
        # a blob the cached source does hold mounts
        add_image(env.hub, "library/alpine", "3", [b"alpine layer"])
        async with env.anonymous.get(f"{env.base}/v2/library/alpine/manifests/3") as r:
            layer = (await r.json())["layers"][0]["digest"]
        async with env.anonymous.get(f"{env.base}/v2/library/alpine/blobs/{layer}") as r:
            assert r.status == 200
        await wait_stored(tmp_path / "data", layer)  # (published just after the last byte)
        url = f"{env.base}/v2/team/x/blobs/uploads/?mount={layer}&from=library/alpine"
        async with env.pusher.post(url) as r:
            assert r.status == 201


async def test_content_does_not_cross_upstreams(aiohttp_server, tmp_path):
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        only_ghcr = b"only ghcr.io has this"
        add_image(env.ghcr, "org/tool", "v1", [only_ghcr])
        async with env.anonymous.get(f"{env.base}/v2/ghcr.io/org/tool/manifests/v1") as r:
            layer = (await r.json())["layers"][0]["digest"]
        status, body = await status_and_body(
            env.anonymous, "GET", f"{env.base}/v2/ghcr.io/org/tool/blobs/{layer}")
        assert status == 200 and body == only_ghcr
        for url in (f"/v2/library/alpine/blobs/{layer}", f"/v2/library/tool/blobs/{layer}?ns=docker.io"):
            status, body = await status_and_body(env.anonymous, "GET", env.base + url)
            assert status == 404 and only_ghcr not in body


async def test_a_stored_blob_is_confirmed_once_then_linked(aiohttp_server, tmp_path):
    """Dedup keeps working: a layer stored for one repository is served to another after
    one upstream HEAD for that name, never a second download."""
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        shared = b"a shared base layer " + os.urandom(1000)
        add_image(env.hub, "library/a", "v1", [shared])
        async with env.anonymous.get(f"{env.base}/v2/library/a/manifests/v1") as r:
            layer = (await r.json())["layers"][0]["digest"]
        status, _ = await status_and_body(env.anonymous, "GET", f"{env.base}/v2/library/a/blobs/{layer}")
        assert status == 200
        assert env.hub.count("HEAD", "/blobs/") == 0  # the manifest's references were linked
        assert env.hub.blob_repos is not None
        env.hub.blob_repos[layer].add("library/b")  # library/b has it upstream too
        for _ in range(3):
            status, body = await status_and_body(
                env.anonymous, "GET", f"{env.base}/v2/library/b/blobs/{layer}")
            assert status == 200 and body == shared
        assert env.hub.count("HEAD", f"/library/b/blobs/{layer}") == 1
        assert env.hub.count("GET", f"/blobs/{layer}") == 1  # stored once, never re-fetched


async def test_an_unconfirmable_link_is_a_404_during_an_outage(aiohttp_server, tmp_path):
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        add_image(env.hub, "library/a", "v1", [b"layer of a"])
        async with env.anonymous.get(f"{env.base}/v2/library/a/manifests/v1") as r:
            layer = (await r.json())["layers"][0]["digest"]
        await status_and_body(env.anonymous, "GET", f"{env.base}/v2/library/a/blobs/{layer}")
        env.hub.status = 503
        status, _ = await status_and_body(env.anonymous, "GET", f"{env.base}/v2/library/a/blobs/{layer}")
        assert status == 200  # linked: served through the outage
        status, body = await status_and_body(
            env.anonymous, "GET", f"{env.base}/v2/library/b/blobs/{layer}")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


# -- the property: no digest request returns content the repository does not hold --------

REPOS = ["library/r0", "library/r1", "ghcr.io/o/r2", "private/p0", "team/t0"]
CONTENTS = [f"content {i} ".encode() * 20 for i in range(4)]
ANON_PATTERNS = ["library/*", "ghcr.io/**", "library/r1", "private/p0"]
USER_PATTERNS = ["private/*", "team/*", "ghcr.io/**", "library/r0", "**"]
ADMIN = {"Authorization": aiohttp.encode_basic_auth("admin", "pw")}
USER = {"Authorization": aiohttp.encode_basic_auth("user", "pw")}


def matches(pattern: str, name: str) -> bool:
    """The test's own model of the patterns it draws (exact, ``x/*`` one level, ``**``)."""
    if pattern == "**":
        return True
    if pattern.endswith("/**"):
        return name.startswith(pattern[:-2])
    if pattern.endswith("/*"):
        head, _, tail = name.rpartition("/")
        return head == pattern[:-2] and "/" not in tail
    return pattern == name


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(holdings=st.dictionaries(st.sampled_from(REPOS),
                                st.sets(st.integers(0, len(CONTENTS) - 1), min_size=1),
                                min_size=1),
       anonymous_pull=st.lists(st.sampled_from(ANON_PATTERNS), unique=True),
       user_pull=st.lists(st.sampled_from(USER_PATTERNS), unique=True),
       probes=st.lists(st.tuples(st.sampled_from(REPOS), st.integers(0, len(CONTENTS) - 1),
                                 st.sampled_from(["anonymous", "user"]),
                                 st.sampled_from(["GET", "HEAD"])), min_size=4, max_size=12))
def test_no_digest_request_returns_content_the_repository_does_not_hold(
        tmp_path_factory, holdings, anonymous_pull, user_pull, probes):
    """Random hosted and cached repositories holding random blobs (all of which end up in
    the shared pool), random anonymous and user pull rules: every blob request by digest
    gets 200 exactly when the caller may pull the repository and the repository holds it."""
    rules = {"htpasswd": "htpasswd", "anonymous_pull": anonymous_pull, "rules": [
        {"users": ["admin"], "repositories": ["**"], "actions": ["pull", "push"]},
        *([{"users": ["user"], "repositories": user_pull, "actions": ["pull"]}]
          if user_pull else [])]}
    asyncio.run(_check_holdings(tmp_path_factory.mktemp("prop"), rules, holdings, probes))


async def _check_holdings(tmp_path: Path, rules: dict, holdings: dict[str, set[int]],
                          probes) -> None:
    hub, ghcr = FakeUpstream(blob_repos={}), FakeUpstream(blob_repos={})
    servers = [TestServer(hub.app()), TestServer(ghcr.app())]
    for server in servers:
        await server.start_server()
    urls = {"docker.io": str(servers[0].make_url("")).rstrip("/"),
            "ghcr.io": str(servers[1].make_url("")).rstrip("/")}
    write_htpasswd(tmp_path / "htpasswd", {"admin": "pw", "user": "pw"})
    cfg = make_config(tmp_path / "data", urls, hosted=("private/*", "team/*"),
                      auth=parse_auth(rules, tmp_path))
    proxy = TestServer(create_app(cfg))
    await proxy.start_server()
    base = str(proxy.make_url("")).rstrip("/")
    digests = [digest_of(c) for c in CONTENTS]
    sessions = {"anonymous": aiohttp.ClientSession(), "user": aiohttp.ClientSession(headers=USER)}
    try:
        async with aiohttp.ClientSession(headers=ADMIN) as admin:
            for repo, held in holdings.items():  # put everything in place, and in the pool
                layers = [CONTENTS[i] for i in sorted(held)]
                if repo.startswith(("private/", "team/")):
                    await push_image(admin, base, repo, "v", layers)
                    continue
                fake, remote = (ghcr, repo.removeprefix("ghcr.io/")) if repo.startswith(
                    "ghcr.io/") else (hub, repo)
                add_image(fake, remote, "v", layers)
                async with admin.get(f"{base}/v2/{repo}/manifests/v") as r:
                    assert r.status == 200
                for i in sorted(held):
                    async with admin.get(f"{base}/v2/{repo}/blobs/{digests[i]}") as r:
                        assert r.status == 200 and await r.read() == CONTENTS[i]
            for repo, i, who, method in probes:
                patterns = rules["anonymous_pull"] + (
                    [p for rule in rules["rules"][1:] for p in rule["repositories"]]
                    if who == "user" else [])
                may_pull = any(matches(p, repo) for p in patterns)
                holds = i in holdings.get(repo, set())
                async with sessions[who].request(
                        method, f"{base}/v2/{repo}/blobs/{digests[i]}") as r:
                    body = await r.read()
                    assert (r.status == 200) == (may_pull and holds), (repo, i, who, r.status)
                    if r.status == 200:
                        assert method == "HEAD" or body == CONTENTS[i]
                    else:
                        assert r.status in (401, 403, 404), (r.status, body)
                        assert CONTENTS[i] not in body
    finally:
        for session in sessions.values():
            await session.close()
        await proxy.close()
        for server in servers:
            await server.close()


# -- found in review: ways around the links ---------------------------------------------


async def test_a_manifest_fetch_is_not_shared_with_another_repository(aiohttp_server, tmp_path):
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        digest = add_image(env.ghcr, "org/secret", "v1", [b"ghcr private layer"])
        env.ghcr.manifest_delay = 0.5
        owner = asyncio.create_task(status_and_body(
            env.pusher, "GET", f"{env.base}/v2/ghcr.io/org/secret/manifests/{digest}"))
        while not env.ghcr.count("GET", f"/manifests/{digest}"):  # noqa: ASYNC110 (the owner's
            await asyncio.sleep(0.01)                            # fetch is running upstream)
        status, body = await status_and_body(
            env.anonymous, "GET", f"{env.base}/v2/library/zzz/manifests/{digest}")
        assert status == 404 and b"ghcr private layer" not in body
        assert (await owner)[0] == 200


async def test_references_to_stored_objects_are_not_trusted_blindly(aiohttp_server, tmp_path):
    """An upstream manifest naming a digest it does not hold (a foreign layer, an index
    child some registries do not check) must not unlock that object from the pool."""
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        secret = b"private layer bytes"
        pushed = await push_image(env.pusher, env.base, "private/secret", "v1", [secret])
        layer = pushed.layers[0].digest
        foreign = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": env.hub.add_blob(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar",
                        "digest": layer, "size": len(secret), "urls": ["https://x.invalid/l"]}],
        }).encode()
        index = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": pushed.media_type, "digest": pushed.digest,
                           "size": len(pushed.manifest)}],
        }).encode()
        env.hub.add_manifest("library/evil", "latest", foreign, "application/vnd.oci.image.manifest.v1+json")
        env.hub.add_manifest("library/evil", "idx", index, "application/vnd.oci.image.index.v1+json")
        for tag in ("latest", "idx"):
            async with env.anonymous.get(f"{env.base}/v2/library/evil/manifests/{tag}",
                                         headers={"Accept": "application/vnd.oci.image.index.v1+json,"
                                                  "application/vnd.oci.image.manifest.v1+json"}) as r:
                assert r.status == 200
        status, body = await status_and_body(
            env.anonymous, "GET", f"{env.base}/v2/library/evil/blobs/{layer}")
        assert status == 404 and secret not in body
        status, body = await status_and_body(
            env.anonymous, "GET", f"{env.base}/v2/library/evil/manifests/{pushed.digest}")
        assert status == 404 and pushed.manifest not in body
        url = f"{env.base}/v2/team/x/blobs/uploads/?mount={layer}&from=library/evil"
        async with env.pusher.post(url) as r:
            assert r.status == 202


async def test_manifest_answers_do_not_tell_what_the_pool_holds_when_upstream_fails(
        aiohttp_server, tmp_path):
    env = await env_of(aiohttp_server, tmp_path)
    async with env.anonymous, env.pusher:
        pushed = await push_image(env.pusher, env.base, "private/secret", "v1", [b"p"])
        absent = digest_of(b"no manifest has this digest")
        for failure in (429, 503):
            env.hub.status = failure
            answers = set()
            for digest in (pushed.digest, absent):
                for method in ("GET", "HEAD"):
                    async with env.anonymous.request(
                            method, f"{env.base}/v2/library/zzz/manifests/{digest}") as r:
                        answers.add((method, r.status))
            assert answers == {("GET", 404), ("HEAD", 404)}, (failure, answers)
