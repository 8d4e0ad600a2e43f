"""What an operator configures: `--upstream`, the defaults, the environment (issue 17)."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from proxy.config import ConfigError, from_dict, load, parse_duration, parse_size
from proxy.defaults import DEFAULTS
from proxy.routing import Namespaces
from tests.support.edge import write_htpasswd
from tests.support.images import make_tar_layer, push_image
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import RegistryProcess
from tests.support.skopeo import skopeo_inspect
from tests.support.store import is_manifest_stored

SHIPPED = Path(__file__).resolve().parents[2] / "config.toml"

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


# -- item 10: a drop-in for registry:2 --------------------------------------------------------


def test_distribution_proxy_variables_set_the_default_upstream(tmp_path):
    secret = tmp_path / "hub-password"
    secret.write_text("s3cret\n")  # as `echo` writes it: the newline is not the password's
    cfg = load(None, env={"REGISTRY_PROXY_REMOTEURL": "https://registry-1.docker.io",
                          "REGISTRY_PROXY_USERNAME": "robot",
                          "REGISTRY_PROXY_PASSWORD_FILE": str(secret)})
    hub = cfg.upstreams["docker.io"]
    assert (cfg.default_upstream, hub.url, hub.username, hub.password) == (
        "docker.io", "https://registry-1.docker.io", "robot", "s3cret")
    cfg = load(SHIPPED, env={"REGISTRY_PROXY_REMOTEURL": "http://10.0.0.9:5000",
                             "REGISTRY_PROXY_USERNAME": "u", "REGISTRY_PROXY_PASSWORD": "p"})
    names = Namespaces(cfg.upstreams, cfg.default_upstream, cfg.hosted)
    place = names.place("library/alpine", "docker.io")  # as `--upstream`: every name of it
    assert place.upstream == cfg.default_upstream == "10.0.0.9:5000"
    assert (cfg.upstreams["10.0.0.9:5000"].username, cfg.upstreams["10.0.0.9:5000"].password) == ("u", "p")
    cfg = load(None, env={"REGISTRY_PROXY_USERNAME": "u", "REGISTRY_PROXY_PASSWORD": "p"})
    assert cfg.upstreams["docker.io"].username == "u"  # no REMOTEURL: the default's credentials
    for env, key in (({"REGISTRY_PROXY_USERNAME": "u"}, "REGISTRY_PROXY_PASSWORD"),
                     ({"REGISTRY_PROXY_REMOTEURL": "ftp://x"}, "REGISTRY_PROXY_REMOTEURL"),
                     ({"REGISTRY_PROXY_PASSWORD": "p", "REGISTRY_PROXY_PASSWORD_FILE": str(secret),
                       "REGISTRY_PROXY_USERNAME": "u"}, "REGISTRY_PROXY_PASSWORD_FILE"),
                     ({"REGISTRY_PROXY_PASSWORD_FILE": str(tmp_path / "none"),
                       "REGISTRY_PROXY_USERNAME": "u"}, "REGISTRY_PROXY_PASSWORD_FILE"),
                     ({"REGISTRY_PROXY_REMOTEURL": "https://team", "REGPROXY_HOSTED_REPOSITORIES":
                       '["team/*"]'}, "hosted.repositories")):
        with pytest.raises(ConfigError) as err:
            load(None, env=env)
        assert err.value.key == key, env


def test_upstreams_and_their_credentials_from_the_environment(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-a-file")
    cfg = load(SHIPPED, env={
        "REGPROXY_UPSTREAMS_DOCKER_IO_USERNAME": "me",
        "REGPROXY_UPSTREAMS_DOCKER_IO_PASSWORD_FILE": str(secret),
        "REGPROXY_UPSTREAMS_DOCKER_IO_CONNECT_TIMEOUT": "2",
        "REGPROXY_UPSTREAMS_GCR_IO_URL": "https://gcr.io",  # new: `_` reads as `.`
        "REGPROXY_UPSTREAMS_CORP_NAME": "registry.corp-1.example:5000",  # new, any name
        "REGPROXY_UPSTREAMS_CORP_URL": "https://registry.corp-1.example:5000",
        "REGPROXY_UPSTREAMS_CORP_ALIASES": '["corp.example"]',
        "REGPROXY_UPSTREAMS_CORP_PASSWORD": "12345",  # digits stay a string
        "REGPROXY_UPSTREAMS_CORP_USERNAME": "true",
        "REGPROXY_UPSTREAMS_QUAY_IO": "false",  # removed
    })
    hub = cfg.upstreams["docker.io"]
    assert (hub.url, hub.username, hub.password, hub.connect_timeout) == (
        "https://registry-1.docker.io", "me", "from-a-file", 2.0)
    assert cfg.upstreams["gcr.io"].url == "https://gcr.io"
    corp = cfg.upstreams["registry.corp-1.example:5000"]
    assert (corp.aliases, corp.username, corp.password) == (("corp.example",), "true", "12345")
    assert "quay.io" not in cfg.upstreams and "ghcr.io" in cfg.upstreams
    # a configured upstream is found by its name's variable form, a port included
    path = tmp_path / "c.toml"
    path.write_text('[upstreams."registry.internal:5000"]\nurl = "http://registry.internal:5000"\n')
    cfg = load(path, env={"REGPROXY_UPSTREAMS_REGISTRY_INTERNAL_5000_USERNAME": "a",
                          "REGPROXY_UPSTREAMS_REGISTRY_INTERNAL_5000_PASSWORD": "b"})
    assert cfg.upstreams["registry.internal:5000"].username == "a"
    for env, key in (({"REGPROXY_UPSTREAMS_DOCKER_IO_NOPE": "1"}, "REGPROXY_UPSTREAMS_DOCKER_IO_NOPE"),
                     ({"REGPROXY_UPSTREAMS_X_IO_USERNAME": "u", "REGPROXY_UPSTREAMS_X_IO_PASSWORD": "p"},
                      "upstreams.x.io.url"),
                     ({"REGPROXY_UPSTREAMS_URL": "https://x.io"}, "REGPROXY_UPSTREAMS_URL"),
                     ({"REGPROXY_UPSTREAMS_DOCKER_IO_PASSWORD": "p"}, "upstreams.docker.io.username")):
        with pytest.raises(ConfigError) as err:
            load(None, env=env)
        assert err.value.key == key, env
    # any REGPROXY_ setting can come from a file (Kubernetes Secrets, Docker secrets)
    (tmp_path / "cs").write_text("c" * 20 + "\n")
    cfg = load(None, env={"REGPROXY_CACHE_BACKEND": "redis", "REGPROXY_CACHE_URL": "redis://r:6379/0",
                          "REGPROXY_CLUSTER_ADVERTISE_URL": "http://10.0.0.1:5000",
                          "REGPROXY_CLUSTER_SECRET_FILE": str(tmp_path / "cs")})
    assert cfg.cluster is not None and cfg.cluster.secret == "c" * 20


def test_unknown_distribution_variables_that_matter_are_warned_about(caplog):
    caplog.set_level(logging.WARNING, logger="regproxy.config")
    load(None, env={"REGISTRY_PROXY_TTL": "168h", "REGISTRY_STORAGE_DELETE_ENABLED": "true",
                    "REGISTRY_LOG_LEVEL": "debug", "REGISTRY_STORAGE_AZURE_ACCOUNTNAME": "a",
                    # not distribution's: podman's auth file, a Kubernetes Service's variables
                    "REGISTRY_AUTH_FILE": "/run/auth.json", "REGISTRY_PORT": "tcp://10.0.0.1:5000",
                    "REGISTRY_SERVICE_HOST": "10.0.0.1", "REGISTRY_HTTP_ADDR": ":5000"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    for var in ("REGISTRY_PROXY_TTL", "REGISTRY_STORAGE_DELETE_ENABLED", "REGISTRY_LOG_LEVEL",
                "REGISTRY_STORAGE_AZURE_ACCOUNTNAME"):
        assert var in text
    assert "cache.max_age" in text and "hosted.delete_enabled" in text  # what to use instead
    for var in ("REGISTRY_AUTH_FILE", "REGISTRY_PORT", "REGISTRY_SERVICE_HOST", "REGISTRY_HTTP_ADDR"):
        assert var not in text
    assert "168h" not in text  # values are never logged: some are secrets


async def test_a_registry_2_environment_pulls_from_an_authenticated_upstream(http_session, tmp_path):
    """Swapped in for registry:2 with only its proxy variables: the default upstream and its
    credentials come from REGISTRY_PROXY_*, the password from a mounted secret file."""
    write_htpasswd(tmp_path / "htpasswd", {"robot": "s3cret"})
    reg = RegistryProcess(tmp_path / "reg", extra_env={
        "REGISTRY_AUTH": "htpasswd", "REGISTRY_AUTH_HTPASSWD_REALM": "upstream",
        "REGISTRY_AUTH_HTPASSWD_PATH": str(tmp_path / "htpasswd")})
    with reg:
        auth = {"Authorization": aiohttp.encode_basic_auth("robot", "s3cret")}
        async with aiohttp.ClientSession(headers=auth) as pusher:
            img = await push_image(pusher, reg.url, "library/private", "v1", [make_tar_layer(seed=73)])
        (tmp_path / "secret").write_text("s3cret\n")
        env = {"REGISTRY_PROXY_REMOTEURL": reg.url, "REGISTRY_PROXY_USERNAME": "robot",
               "REGISTRY_PROXY_PASSWORD_FILE": str(tmp_path / "secret"),
               "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path / "data")}
        with ProxyProcess(tmp_path / "p", env=env) as proxy:
            for path in ("/v2/library/private/manifests/v1?ns=docker.io",
                         "/v2/docker.io/library/private/manifests/v1"):
                async with http_session.get(proxy.url + path, headers={"Accept": img.media_type}) as r:
                    assert r.status == 200, await r.text()
                    assert r.headers["Docker-Content-Digest"] == img.digest
        assert await is_manifest_stored(tmp_path / "data", img.digest)  # where the variable said


def test_config_defaults_and_errors(tmp_path: Path):
    cfg = load(SHIPPED)
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 5000)
    assert cfg.default_upstream == "docker.io" and cfg.upstreams["docker.io"].library_prefix
    assert cfg.tag_ttl == 300
    assert parse_size("x", "4MiB") == 4 << 20 and parse_duration("x", "1h") == 3600
    cases = [
        ({"server": {"listen": "nope"}}, "server.listen"),
        ({"server": {"lisen": "1:2"}}, "server.lisen"),
        ({"cache": {"tag_ttl": "soon"}}, "cache.tag_ttl"),
        ({"upstreams": {"x.io": {}}}, "upstreams.x.io.url"),
        ({"upstreams": {"x.io": {"url": "ftp://x"}}}, "upstreams.x.io.url"),
        ({"upstreams": {"x.io": {"url": "http://x", "username": "u"}}}, "upstreams.x.io.password"),
        ({"proxy": {"default_upstream": "y.io"}}, "proxy.default_upstream"),
        ({"storage": {"backend": "tape"}}, "storage.backend"),
        ({"storage": {"backend": "s3"}}, "storage.s3.bucket"),
        ({"storage": {"s3": {"bucket": "b"}}}, "storage.s3"),
        ({"storage": {"backend": "s3", "s3": {"bucket": "b", "part_size": "1MiB"}}},
         "storage.s3.part_size"),
        ({"storage": {"backend": "s3", "s3": {"bucket": "b", "access_key": "k"}}},
         "storage.s3.secret_key"),
        ({"storage": {"backend": "s3", "s3": {"bucket": "b", "endpoint": "minio:9000"}}},
         "storage.s3.endpoint"),
        ({"cluster": {"advertise_url": "http://10.0.0.1:5000", "secret": "x" * 20}}, "cluster"),
        ({"cache": {"backend": "redis", "url": "redis://r:6379/0"},
          "cluster": {"advertise_url": "http://10.0.0.1:5000"}}, "cluster.secret"),
        ({"cache": {"backend": "redis", "url": "redis://r:6379/0"},
          "cluster": {"advertise_url": "http://10.0.0.1:5000", "secret": "short"}}, "cluster.secret"),
    ]
    for data, key in cases:
        with pytest.raises(ConfigError) as info:
            from_dict(data)
        assert info.value.key == key
    cfg = from_dict({"storage": {"backend": "s3", "s3": {
                        "bucket": "cache", "endpoint": "http://minio:9000/", "prefix": "rp/",
                        "access_key": "AK", "secret_key": "SK", "redirect": True}},
                     "cache": {"backend": "redis", "url": "redis://r:6379/0"},
                     "cluster": {"advertise_url": "http://10.0.0.1:5000/", "secret": "s" * 32,
                                 "lease": "5s"}})
    assert cfg.s3 is not None and cfg.cluster is not None
    assert (cfg.s3.bucket, cfg.s3.endpoint_url, cfg.s3.prefix, cfg.s3.redirect) == (
        "cache", "http://minio:9000", "rp/", True)
    assert (cfg.cluster.advertise_url, cfg.cluster.lease) == ("http://10.0.0.1:5000", 5.0)
    assert "s" * 32 not in repr(cfg) and "SK" not in repr(cfg.s3)  # secrets stay out of logs
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_upstream_flag_overrides():
    cfg = load(None).with_overrides(upstream="http://127.0.0.1:5001", listen="[::1]:6000",
                                    data_dir="/tmp/x")
    assert cfg.default_upstream == "127.0.0.1:5001"
    assert cfg.upstreams["127.0.0.1:5001"].url == "http://127.0.0.1:5001"
    assert not cfg.upstreams["127.0.0.1:5001"].library_prefix
    assert "docker.io" in cfg.upstreams["127.0.0.1:5001"].aliases  # it took the default's names
    assert (cfg.listen_host, cfg.listen_port, str(cfg.storage_root)) == ("::1", 6000, "/tmp/x")
    hub = load(None).with_overrides(upstream="https://registry-1.docker.io")
    assert hub.default_upstream == "docker.io"
