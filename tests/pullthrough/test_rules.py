"""Allow/deny rules per upstream on the request path (issue 19, item 1), against a real
docker-registry upstream: what the rules allow pulls through, what they deny gets ``403
DENIED`` naming the rule and never reaches the upstream (its access log is the witness),
cached content included; hosted repositories are untouched; config errors name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import create_app
from proxy.config import Config, ConfigError, from_dict, load
from proxy.tools.warm import warm
from tests.support.images import PushedImage, make_tar_layer, push_image
from tests.support.registry import RegistryProcess, upstream_settled
from tests.support.skopeo import read_oci_layout_index, skopeo_copy
from tests.support.store import is_manifest_stored, wait_stored

UP = "upstream.test"
ALLOWED_REPO, OTHER_REPO = "library/rules-app", "rules-other/app"
SEMVER = r"v?\d+\.\d+\.\d+"
RULES: list[dict[str, Any]] = [
    {"action": "deny", "tags": ["latest"], "name": "no floating tags"},
    {"action": "allow", "repositories": ["library/**"], "tag_regex": SEMVER},
]
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json"])


def config(data: Path, reg: RegistryProcess, rules: list[dict[str, Any]] | None = RULES,
           default: str | None = "deny") -> Config:
    """The proxy's configuration as a file would give it: ``reg`` is the default upstream,
    with ``rules`` and ``rules_default`` (left out when ``None``); ``team/**`` is hosted."""
    upstream: dict[str, Any] = {"url": reg.url, "proxy": ""}
    if rules is not None:
        upstream["rules"] = rules
    if default is not None:
        upstream["rules_default"] = default
    return from_dict({"storage": {"root": str(data)}, "proxy": {"default_upstream": UP},
                      "hosted": {"repositories": ["team/**"]}, "upstreams": {UP: upstream}})


async def serve(aiohttp_server: Any, cfg: Config) -> str:
    server = await aiohttp_server(create_app(cfg))
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def images(upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession
                 ) -> dict[str, PushedImage]:
    """``library/rules-app`` as ``1.2.3`` and ``latest``, ``rules-other/app:1.0.0``."""
    reg = upstream_registry
    app = await push_image(http_session, reg.url, ALLOWED_REPO, "1.2.3",
                           [make_tar_layer(seed=1901)], schema="oci")
    await push_image(http_session, reg.url, ALLOWED_REPO, "latest", [make_tar_layer(seed=1901)],
                     schema="oci")
    other = await push_image(http_session, reg.url, OTHER_REPO, "1.0.0",
                             [make_tar_layer(seed=1902)], schema="oci")
    return {"app": app, "other": other}


async def denied(session: aiohttp.ClientSession, method: str, url: str) -> str:
    """The ``DENIED`` message of a refused request (a HEAD has only the status)."""
    async with session.request(method, url, headers={"Accept": MANIFEST_TYPES}) as r:
        assert r.status == 403, (method, url, r.status)
        if method == "HEAD":
            return ""
        body = await r.json()
    assert [e["code"] for e in body["errors"]] == ["DENIED"], body
    return str(body["errors"][0]["message"])


def reads_of(reg: RegistryProcess, repo: str) -> int:
    """The requests the upstream logged for ``repo`` other than the test's own pushes."""
    text = reg.log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines()
               if f" /v2/{repo}/" in line and ('"GET ' in line or '"HEAD ' in line))


async def test_an_allowed_tag_pulls_through_with_skopeo(
        aiohttp_server, upstream_registry, http_session, images, tmp_path):
    base = await serve(aiohttp_server, config(tmp_path / "data", upstream_registry))
    host = base.removeprefix("http://")
    app = images["app"]
    out = tmp_path / "pulled"
    await skopeo_copy(f"docker://{host}/{ALLOWED_REPO}:1.2.3", f"oci:{out}", "--preserve-digests")
    assert [m["digest"] for m in read_oci_layout_index(out)["manifests"]] == [app.digest]
    for layer in app.layers:
        assert (out / "blobs" / "sha256" / layer.digest[7:]).stat().st_size == layer.size
    # by digest and the tag list: the repository is allowed (for semver tags)
    async with http_session.get(f"{base}/v2/{ALLOWED_REPO}/manifests/{app.digest}",
                                headers={"Accept": MANIFEST_TYPES}) as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == app.digest
    async with http_session.get(f"{base}/v2/{ALLOWED_REPO}/tags/list") as r:
        assert r.status == 200 and {"1.2.3", "latest"} <= set((await r.json())["tags"])


async def test_a_denied_tag_is_refused_naming_the_rule_and_never_asked_upstream(
        aiohttp_server, upstream_registry, http_session, images, tmp_path):
    reg = upstream_registry
    base = await serve(aiohttp_server, config(tmp_path / "data", reg))
    await upstream_settled(http_session, reg)
    before = reads_of(reg, ALLOWED_REPO)
    url = f"{base}/v2/{ALLOWED_REPO}/manifests/latest"
    message = await denied(http_session, "GET", url)
    assert f"{ALLOWED_REPO}:latest" in message
    assert f"upstreams.{UP}.rules[0]" in message and "no floating tags" in message
    await denied(http_session, "HEAD", url)
    # a tag no rule allows falls to rules_default
    message = await denied(http_session, "GET", f"{base}/v2/{ALLOWED_REPO}/manifests/dev")
    assert f"upstreams.{UP}.rules_default" in message
    await upstream_settled(http_session, reg)
    assert reads_of(reg, ALLOWED_REPO) == before


async def test_a_denied_repository_is_refused_for_every_read_and_never_asked_upstream(
        aiohttp_server, upstream_registry, http_session, images, tmp_path):
    reg = upstream_registry
    other = images["other"]
    base = await serve(aiohttp_server, config(tmp_path / "data", reg))
    await upstream_settled(http_session, reg)
    before = reads_of(reg, OTHER_REPO)
    repo = f"{base}/v2/{OTHER_REPO}"
    reads = [("GET", f"{repo}/manifests/1.0.0"), ("HEAD", f"{repo}/manifests/1.0.0"),
             ("GET", f"{repo}/manifests/{other.digest}"), ("HEAD", f"{repo}/manifests/{other.digest}"),
             ("GET", f"{repo}/blobs/{other.layers[0].digest}"),
             ("HEAD", f"{repo}/blobs/{other.config.digest}"), ("GET", f"{repo}/tags/list")]
    for method, url in reads:
        message = await denied(http_session, method, url)
        assert method == "HEAD" or f"upstreams.{UP}.rules_default" in message
    assert f"{OTHER_REPO}@{other.digest}" in await denied(http_session, "GET", reads[2][1])
    # warm-up goes through the same API: it reports the denial and fetches nothing
    report = await warm([f"{OTHER_REPO}:1.0.0"], base)
    assert [image for image, _ in report.failed] == [f"{OTHER_REPO}:1.0.0"]
    why = report.failed[0][1]
    assert "HTTP 403: DENIED" in why and f"upstreams.{UP}.rules_default" in why, why
    await upstream_settled(http_session, reg)
    assert reads_of(reg, OTHER_REPO) == before


async def test_rules_apply_to_content_cached_before_them(
        aiohttp_server, upstream_registry, http_session, images, tmp_path):
    """Cached and linked content of a denied repository is not served either: a rule added
    later takes effect at once."""
    reg = upstream_registry
    data = tmp_path / "data"
    other = images["other"]
    open_base = await serve(aiohttp_server, config(data, reg, rules=None, default=None))
    report = await warm([f"{OTHER_REPO}:1.0.0"], open_base)
    assert report.ok, report.failed
    await wait_stored(data, other.config.digest, *(d.digest for d in other.layers))
    assert await is_manifest_stored(data, other.digest)
    ruled = await serve(aiohttp_server, config(data, reg))
    await upstream_settled(http_session, reg)
    before = reads_of(reg, OTHER_REPO)
    repo = f"{ruled}/v2/{OTHER_REPO}"
    for url in (f"{repo}/manifests/1.0.0", f"{repo}/manifests/{other.digest}",
                f"{repo}/blobs/{other.layers[0].digest}", f"{repo}/tags/list"):
        await denied(http_session, "GET", url)
    await upstream_settled(http_session, reg)
    assert reads_of(reg, OTHER_REPO) == before


async def test_the_catalog_leaves_out_cached_repositories_the_rules_deny(
        aiohttp_server, upstream_registry, http_session, images, tmp_path):
    """A repository whose every read is denied is not advertised by ``_catalog`` either,
    though it is still stored; an allowed one is listed."""
    reg = upstream_registry
    data = tmp_path / "data"
    open_base = await serve(aiohttp_server, config(data, reg, rules=None, default=None))
    report = await warm([f"{OTHER_REPO}:1.0.0", f"{ALLOWED_REPO}:1.2.3"], open_base)
    assert report.ok, report.failed
    async with http_session.get(f"{open_base}/v2/_catalog") as r:
        assert r.status == 200
        assert {OTHER_REPO, ALLOWED_REPO} <= set((await r.json())["repositories"])
    ruled = await serve(aiohttp_server, config(data, reg))
    async with http_session.get(f"{ruled}/v2/_catalog") as r:
        assert r.status == 200
        listed = (await r.json())["repositories"]
    assert ALLOWED_REPO in listed
    assert OTHER_REPO not in listed


async def test_warm_up_of_an_allowed_tag_works_and_hosted_repositories_ignore_the_rules(
        aiohttp_server, upstream_registry, http_session, images, tmp_path):
    base = await serve(aiohttp_server, config(tmp_path / "data", upstream_registry, rules=[]))
    # rules = [] with rules_default = "deny": nothing may come from this upstream
    refused = await warm([f"{ALLOWED_REPO}:1.2.3"], base)
    assert [why for _, why in refused.failed] and "DENIED" in refused.failed[0][1], refused.failed
    hosted = await push_image(http_session, base, "team/rules", "latest", [make_tar_layer(seed=1903)],
                              schema="oci")
    async with http_session.get(f"{base}/v2/team/rules/manifests/latest",
                                headers={"Accept": MANIFEST_TYPES}) as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == hosted.digest
    allowed = await serve(aiohttp_server, config(tmp_path / "data2", upstream_registry))
    report = await warm([f"{ALLOWED_REPO}:1.2.3"], allowed)
    assert report.ok and report.blobs == 1 + len(images["app"].layers), report.failed


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize(("upstream", "key"), [
    ({"rules": [{"action": "allow"}]}, f"upstreams.{UP}.rules_default"),
    ({"rules_default": "maybe"}, f"upstreams.{UP}.rules_default"),
    ({"rules": {"action": "allow"}, "rules_default": "deny"}, f"upstreams.{UP}.rules"),
    ({"rules": [{"action": "allow"}, {"action": "permit"}], "rules_default": "deny"},
     f"upstreams.{UP}.rules[1].action"),
    ({"rules": [{"action": "deny", "repositories": ["Library/*"]}], "rules_default": "allow"},
     f"upstreams.{UP}.rules[0].repositories"),
    ({"rules": [{"action": "deny", "tag_regex": "("}], "rules_default": "allow"},
     f"upstreams.{UP}.rules[0].tag_regex"),
    ({"rules": [{"action": "deny", "tag": "latest"}], "rules_default": "allow"},
     f"upstreams.{UP}.rules[0].tag"),
])
def test_a_config_error_names_the_key(upstream, key, tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict({"storage": {"root": str(tmp_path)},
                   "upstreams": {UP: {"url": "http://127.0.0.1:1", **upstream}}})
    assert err.value.key == key, err.value


def test_a_config_error_is_one_line_naming_the_key_and_the_environment_can_set_rules(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[upstreams."docker.io"]\nrules_default = "deny"\n'
                    'rules = [{ action = "allow", repositories = ["library/**"] },\n'
                    '         { action = "deny", tags = ["bad tag"] }]\n')
    proc = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "upstreams.docker.io.rules[1].tags" in proc.stderr
    cfg = load(None, env={"REGPROXY_UPSTREAMS_DOCKER_IO_RULES_DEFAULT": "deny",
                          "REGPROXY_UPSTREAMS_DOCKER_IO_RULES":
                              '[{ action = "allow", repositories = ["library/*"] }]'})
    rules = cfg.upstreams["docker.io"].rules
    assert rules is not None
    assert rules.decide("library/alpine", "3.20").allowed
    assert not rules.decide("bitnami/redis", "7").allowed
    assert cfg.upstreams["ghcr.io"].rules is None  # no rules: everything allowed
