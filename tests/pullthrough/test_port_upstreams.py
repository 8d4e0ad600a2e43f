"""An upstream named by host:port (issue 17, item 2): containerd sends such ``ns`` values for
private registries, podman and the warm tool use them as path prefixes."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from proxy.config import ConfigError, from_dict, load
from proxy.routing import Namespaces
from tests.support.daemons import Containerd, write_hosts_toml
from tests.support.images import make_tar_layer, push_image
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import RegistryProcess
from tests.support.skopeo import skopeo_inspect

PORTED = "registry.internal:5000"
KEY = "registry.internal_5000"  # the name and key form: ':' is not in the name grammar


def names(**extra: object) -> Namespaces:
    cfg = from_dict({"upstreams": {PORTED: {"url": "http://10.0.0.9:5000",
                                            "aliases": ["mirror.internal:443"]}}, **extra})
    return Namespaces(cfg.upstreams, cfg.default_upstream, cfg.hosted)


def test_every_way_of_naming_a_ported_upstream_leads_to_one_repository():
    ns = names(hosted={"repositories": ["team/*", "registry.internal/*"]})
    want = (f"{KEY}/org/img", f"{KEY}/org/img", "org/img", PORTED)
    for name, via in (("org/img", PORTED), ("org/img", KEY), (f"{PORTED}/org/img", None),
                      (f"{KEY}/org/img", None), ("org/img", "mirror.internal:443"),
                      ("mirror.internal:443/org/img", None), ("mirror.internal_443/org/img", None)):
        place = ns.place(name, via)
        assert (place.name, place.key, place.remote, place.upstream) == want, (name, via)
    assert ns.name_of_key(f"{KEY}/org/img") == f"{KEY}/org/img"
    assert ns.is_cached_key(f"{KEY}/org/img")
    # hosted names stay apart: `registry.internal/x` is hosted, not the ported upstream's
    assert ns.place("registry.internal/x").upstream is None
    assert ns.place("registry.internal/x").key == "registry.internal/x"


def test_hosted_patterns_may_not_take_a_ported_upstreams_key():
    for pattern in (f"{KEY}/*", "mirror.internal_443/**"):
        with pytest.raises(ConfigError) as err:
            names(hosted={"repositories": [pattern]})
        assert err.value.key == "hosted.repositories"


def test_a_ported_default_upstream_keeps_keys_in_the_name_grammar():
    cfg = load(None, env={}).with_overrides(upstream="http://127.0.0.1:5001")
    ns = Namespaces(cfg.upstreams, cfg.default_upstream, cfg.hosted)
    place = ns.place("library/alpine")
    assert (place.name, place.key) == ("library/alpine", "127.0.0.1_5001/library/alpine")
    assert ns.place("127.0.0.1:5001/library/alpine").key == place.key
    assert ns.name_of_key(place.key) == "library/alpine"


def write_config(path: Path, reg: RegistryProcess, name: str) -> Path:
    path.write_text(f'[storage]\nroot = "data"\n[upstreams."{name}"]\nurl = "{reg.url}"\n')
    return path


async def test_pull_through_a_ported_upstream_by_ns_and_by_prefix(
        upstream_registry, http_session: aiohttp.ClientSession, tmp_path):
    reg = upstream_registry
    img = await push_image(http_session, reg.url, "it/ported", "v1", [make_tar_layer(seed=91)])
    config = write_config(tmp_path / "c.toml", reg, PORTED)
    with ProxyProcess(tmp_path / "p", "--config", str(config)) as proxy:
        for path in (f"/v2/it/ported/manifests/v1?ns={PORTED}",
                     f"/v2/{PORTED}/it/ported/manifests/v1",
                     f"/{PORTED}/v2/it/ported/manifests/v1",
                     f"/v2/{KEY}/it/ported/manifests/v1"):
            async with http_session.get(proxy.url + path, headers={"Accept": img.media_type}) as r:
                assert r.status == 200, (path, await r.text())
                assert r.headers["Docker-Content-Digest"] == img.digest
        layer = img.layers[0].digest
        async with http_session.get(f"{proxy.url}/v2/{PORTED}/it/ported/blobs/{layer}") as r:
            assert r.status == 200 and len(await r.read()) == img.layers[0].size
        # skopeo refuses ':' inside a repository path; the key form is what it can name
        info = await skopeo_inspect(f"docker://{proxy.host}/{KEY}/it/ported:v1")
        assert info["Digest"] == img.digest
        async with http_session.get(f"{proxy.url}/v2/_catalog") as r:
            assert await r.json() == {"repositories": [f"{KEY}/it/ported"]}
        async with http_session.get(f"{proxy.url}/v2/{PORTED}/it/ported/tags/list") as r:
            assert (await r.json())["tags"] == ["v1"]


@pytest.mark.e2e
async def test_containerd_pulls_a_ported_registry_through_hosts_toml(
        upstream_registry, http_session: aiohttp.ClientSession, tmp_path):
    reg = upstream_registry
    img = await push_image(http_session, reg.url, "it/ctr-ported", "v1", [make_tar_layer(seed=92)],
                           schema="oci")
    config = write_config(tmp_path / "c.toml", reg, PORTED)
    with ProxyProcess(tmp_path / "p", "--config", str(config)) as proxy:
        hosts = tmp_path / "hosts"
        # the fallback server, https://registry.internal:5000, goes to the daemons' closed proxy
        write_hosts_toml(hosts, proxy.url, PORTED)
        with Containerd(tmp_path / "c1") as ctrd:
            ref = f"{PORTED}/it/ctr-ported:v1"
            res = await ctrd.apull(ref, hosts, unpack=False)
            assert res.returncode == 0, f"{res.stderr}\n{ctrd.log_tail()}"
            assert await ctrd.aimage_digest(ref) == img.digest
        assert "ns=registry.internal%3A5000" in proxy.log_path.read_text()  # containerd sent it


async def test_layout_upgrade_moves_keys_of_ported_upstreams(tmp_path):
    """Layout 2 kept `--upstream http://host:port` content under `host:port/...`: moved once."""
    from proxy.layout import LAYOUT_VERSION, upgrade
    from proxy.reference import Digest
    from proxy.storage.backend import open_filesystem

    store, _ = open_filesystem(tmp_path / "data")
    digest = Digest.of(b"m")
    await store.set_layout_version(2)
    await store.set_tag("127.0.0.1:5001/library/a", "v1", digest)
    await store.link_manifest("127.0.0.1:5001/library/a", digest)
    await store.set_tag("team/kept", "v1", digest)  # a hosted repository whose pattern went
    cfg = load(None, env={}).with_overrides(upstream="http://127.0.0.1:5001")
    ns = Namespaces(cfg.upstreams, cfg.default_upstream, cfg.hosted)
    assert await upgrade(store, ns) == [("127.0.0.1:5001/library/a", "127.0.0.1_5001/library/a")]
    assert await store.list_repositories() == ["127.0.0.1_5001/library/a", "team/kept"]
    assert await store.get_tag("127.0.0.1_5001/library/a", "v1") == digest
    assert await store.layout_version() == LAYOUT_VERSION
    assert await upgrade(store, ns) == []
