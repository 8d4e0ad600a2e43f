"""What an operator configures: `--upstream`, the defaults, the environment (issue 17)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import ConfigError, load
from proxy.defaults import DEFAULTS
from proxy.routing import Namespaces
from tests.support.images import make_tar_layer, push_image
from tests.support.proxyproc import ProxyProcess
from tests.support.skopeo import skopeo_inspect

SHIPPED = Path(__file__).resolve().parent.parent / "config.toml"

# -- item 3: --upstream re-points the default upstream for every way of naming it -----------


def test_upstream_flag_takes_every_name_of_the_default_upstream():
    cfg = load(SHIPPED, env={}).with_overrides(upstream="http://127.0.0.1:5001")
    names = Namespaces(cfg.upstreams, cfg.default_upstream, cfg.hosted)
    plain = names.place("library/alpine")
    for name, ns in (("library/alpine", "docker.io"), ("docker.io/library/alpine", None),
                     ("library/alpine", "index.docker.io"), ("index.docker.io/library/alpine", None),
                     ("library/alpine", "127.0.0.1:5001")):
        place = names.place(name, ns)
        assert (place.upstream, place.key, place.name) == (plain.upstream, plain.key, plain.name)
    assert plain.upstream == cfg.default_upstream
    assert cfg.upstreams[plain.upstream].url == "http://127.0.0.1:5001"
    assert "docker.io" not in cfg.upstreams  # nothing is left that would reach Docker Hub
    assert names.place("ghcr.io/org/img").upstream == "ghcr.io"  # the others stay


def test_upstream_flag_re_points_an_upstream_it_names():
    cfg = load(None, env={}).with_overrides(upstream="https://mirror.gcr.io")
    assert cfg.upstreams[cfg.default_upstream].url == "https://mirror.gcr.io"
    cfg = load(None, env={}).with_overrides(upstream="https://registry-1.docker.io/")
    assert cfg.default_upstream == "docker.io"
    assert cfg.upstreams["docker.io"].library_prefix
    cfg = load(SHIPPED, env={}).with_overrides(upstream="https://ghcr.io")
    names = Namespaces(cfg.upstreams, cfg.default_upstream, cfg.hosted)
    assert names.place("library/alpine", "docker.io").upstream == "ghcr.io"


def test_upstream_flag_may_not_overlap_a_hosted_pattern():
    """A security review found `--upstream https://team` beside hosted `team/*`: the
    upstream's keys (`team/<remote>`) would be a hosted repository's."""
    for hosted, upstream in ((["team/*"], "https://team"), (["team/**"], "http://team"),
                             (["index.docker.io/*"], None)):
        with pytest.raises(ConfigError) as err:
            load(None, env={}).with_overrides(upstream=upstream, hosted=hosted)
        assert err.value.key == "hosted.repositories"
    proc = subprocess.run([sys.executable, "-m", "proxy", "serve", "--upstream", "https://team",
                           "--hosted", "team/*"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "hosted.repositories" in proc.stderr


async def test_upstream_flag_serves_ns_and_prefix_requests_from_it(
        upstream_registry, http_session, tmp_path):
    reg = upstream_registry
    img = await push_image(http_session, reg.url, "library/repoint", "v1", [make_tar_layer(seed=71)])
    with ProxyProcess(tmp_path / "p", "--upstream", reg.url, "--data-dir", str(tmp_path / "d")) as proxy:
        for url in (f"{proxy.url}/v2/library/repoint/manifests/v1?ns=docker.io",
                    f"{proxy.url}/v2/docker.io/library/repoint/manifests/v1",
                    f"{proxy.url}/docker.io/v2/library/repoint/manifests/v1"):
            async with http_session.get(url, headers={"Accept": img.media_type}) as r:
                assert r.status == 200, (url, await r.text())
                assert r.headers["Docker-Content-Digest"] == img.digest
        info = await skopeo_inspect(f"docker://{proxy.host}/docker.io/library/repoint:v1")
        assert info["Digest"] == img.digest


# -- item 4: one source of defaults, merged key by key --------------------------------------


def test_the_shipped_config_is_exactly_the_embedded_defaults():
    with SHIPPED.open("rb") as fh:
        assert tomllib.load(fh) == DEFAULTS  # key for key, nothing more or less
    shipped, embedded = load(SHIPPED, env={}), load(None, env={})
    assert shipped.storage_root == SHIPPED.parent / "data"  # relative to the file
    assert replace(shipped, storage_root=embedded.storage_root) == embedded
    assert list(embedded.upstreams) == ["docker.io", "ghcr.io", "quay.io"]
    assert embedded.upstreams["docker.io"].aliases == (
        "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


def test_a_file_is_merged_over_the_defaults_key_by_key(tmp_path):
    only_server = tmp_path / "server.toml"
    only_server.write_text('[server]\nlisten = "127.0.0.1:6000"\n')
    cfg = load(only_server, env={})
    assert cfg.listen_port == 6000 and cfg.workers == 1
    assert list(cfg.upstreams) == ["docker.io", "ghcr.io", "quay.io"]
    assert cfg.default_upstream == "docker.io" and cfg.tag_ttl == 300

    creds = tmp_path / "creds.toml"
    creds.write_text('[upstreams."docker.io"]\nusername = "me"\npassword = "pw"\n'
                     '[upstreams."registry.internal"]\nurl = "https://registry.internal"\n')
    cfg = load(creds, env={})
    hub = cfg.upstreams["docker.io"]
    assert (hub.url, hub.username, hub.library_prefix) == ("https://registry-1.docker.io", "me", True)
    assert "index.docker.io" in hub.aliases
    assert list(cfg.upstreams) == ["docker.io", "registry.internal", "ghcr.io", "quay.io"]

    private = tmp_path / "private.toml"  # a private registry only: the defaults can go
    private.write_text('[upstreams]\n"docker.io" = false\n"ghcr.io" = false\n"quay.io" = false\n'
                       '[hosted]\nrepositories = ["**"]\n')
    cfg = load(private, env={})
    assert cfg.upstreams == {} and cfg.default_upstream is None and cfg.hosted == ("**",)
    private.write_text('[upstreams]\n"docker.io" = false\n[proxy]\ndefault_upstream = "docker.io"\n')
    with pytest.raises(ConfigError) as err:
        load(private, env={})
    assert err.value.key == "proxy.default_upstream"
    private.write_text('[hosted]\nrepositories = ["**"]\n')
    with pytest.raises(ConfigError, match='= false under'):
        load(private, env={})
