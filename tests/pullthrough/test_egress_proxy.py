"""Upstreams through a mandatory egress proxy (issue 17, item 11): a real forward proxy
(tinyproxy) on loopback in front of a docker-registry serving HTTPS, so requests go out as
``CONNECT``, as they do to Docker Hub or ghcr.io; ``HTTPS_PROXY``/``NO_PROXY`` from the
environment, and the per-upstream ``proxy`` setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy import certs
from proxy.config import ConfigError, from_dict
from proxy.upstream.egress import Egress
from tests.support.edge import client_context
from tests.support.forwardproxy import TinyProxy
from tests.support.images import PushedImage, make_tar_layer, push_image
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import RegistryProcess, upstream_gets

CLOSED = "http://127.0.0.1:9"  # nothing listens: a request sent there fails at once


def test_which_requests_take_which_proxy():
    env = {"HTTPS_PROXY": "http://egress:3128", "http_proxy": "http://plain:3128",
           "NO_PROXY": "internal.example, .corp.example,10.0.0.0/8,registry.local:5000"}
    egress = Egress(None, env)
    assert egress.for_url(URL("https://registry-1.docker.io/v2/")) == "http://egress:3128"
    assert egress.for_url(URL("http://mirror.example/v2/")) == "http://plain:3128"
    for direct in ("https://internal.example/v2/", "https://a.internal.example/v2/",
                   "https://x.corp.example/v2/", "https://10.1.2.3/v2/",
                   "http://registry.local:5000/v2/"):
        assert egress.for_url(URL(direct)) is None, direct
    assert egress.for_url(URL("http://registry.local:5001/v2/")) == "http://plain:3128"
    assert Egress(None, {"ALL_PROXY": "http://all:1"}).for_url(URL("https://x/")) == "http://all:1"
    assert Egress(None, {**env, "NO_PROXY": "*"}).for_url(URL("https://x/")) is None
    configured = Egress("http://mine:8080", env)  # the upstream's own setting: for everything
    assert configured.for_url(URL("https://internal.example/v2/")) == "http://mine:8080"
    assert Egress("", env).for_url(URL("https://registry-1.docker.io/")) is None  # "": direct
    cfg = from_dict({"upstreams": {"x.io": {"url": "https://x.io", "proxy": "http://p:3128"}}})
    assert cfg.upstreams["x.io"].proxy == "http://p:3128"
    assert from_dict({}).upstreams["docker.io"].proxy is None
    for bad in ("ftp://p", "http://u:pw@p:3128", 3128):
        with pytest.raises(ConfigError) as err:
            from_dict({"upstreams": {"x.io": {"url": "https://x.io", "proxy": bad}}})
        assert err.value.key == "upstreams.x.io.proxy"


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryProcess, Path]]:
    work = tmp_path_factory.mktemp("egress")
    certs.init(work / "certs", ["localhost"], ["127.0.0.1"])
    reg = RegistryProcess(work / "reg", tls=(work / "certs" / "server.crt",
                                            work / "certs" / "server.key"))
    reg.start()
    try:
        yield reg, work / "certs" / "ca.crt"
    finally:
        reg.stop()


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[TinyProxy]:
    with TinyProxy(tmp_path / "tinyproxy") as proxy:
        yield proxy


async def pushed(reg: RegistryProcess, ca: Path, repo: str, seed: int) -> PushedImage:
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        return await push_image(session, reg.url, repo, "v1", [make_tar_layer(seed=seed)])


def start(tmp_path: Path, reg: RegistryProcess, ca: Path, env: dict[str, str],
          proxy_line: str = "") -> ProxyProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path / "data"}"\n[proxy]\n'
                      f'default_upstream = "upstream.test"\n[upstreams."upstream.test"]\n'
                      f'url = "{reg.url}"\n{proxy_line}\n')
    # the upstream's certificate is signed by the test CA: trusted through OpenSSL's variable
    return ProxyProcess(tmp_path / "p", "--config", str(config),
                        env={"SSL_CERT_FILE": str(ca), **env}).start()


async def pull(proxy: ProxyProcess, img: PushedImage, repo: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/v2/{repo}/manifests/v1", headers={"Accept": img.media_type}) as r:
            assert r.status == 200, (await r.text(), proxy.log_tail())
            assert r.headers["Docker-Content-Digest"] == img.digest
        layer = img.layers[0]
        async with s.get(f"{proxy.url}/v2/{repo}/blobs/{layer.digest}") as r:
            assert r.status == 200 and len(await r.read()) == layer.size


async def test_upstream_requests_go_through_https_proxy_from_the_environment(
        tls_registry, tinyproxy, tmp_path):
    reg, ca = tls_registry
    img = await pushed(reg, ca, "egress/env", 961)
    proxy = start(tmp_path, reg, ca, {"HTTPS_PROXY": tinyproxy.url})
    try:
        await pull(proxy, img, "egress/env")
    finally:
        proxy.stop()
    assert f"CONNECT 127.0.0.1:{reg.port} HTTP/1.1" in tinyproxy.requests()
    assert upstream_gets(reg, "/egress/env/manifests/v1") >= 1  # and the upstream answered it


async def test_no_proxy_and_an_empty_proxy_setting_go_direct(tls_registry, tinyproxy, tmp_path):
    reg, ca = tls_registry
    img = await pushed(reg, ca, "egress/direct", 962)
    proxy = start(tmp_path / "a", reg, ca, {"HTTPS_PROXY": tinyproxy.url, "NO_PROXY": "localhost,127.0.0.1"})
    try:
        await pull(proxy, img, "egress/direct")
    finally:
        proxy.stop()
    proxy = start(tmp_path / "b", reg, ca, {"HTTPS_PROXY": CLOSED}, 'proxy = ""')
    try:
        await pull(proxy, img, "egress/direct")
    finally:
        proxy.stop()
    assert tinyproxy.requests() == []


async def test_a_per_upstream_proxy_setting_wins_over_the_environment(tls_registry, tinyproxy, tmp_path):
    reg, ca = tls_registry
    img = await pushed(reg, ca, "egress/setting", 963)
    proxy = start(tmp_path, reg, ca, {"HTTPS_PROXY": CLOSED, "NO_PROXY": "127.0.0.1"},
                  f'proxy = "{tinyproxy.url}"')
    try:
        await pull(proxy, img, "egress/setting")
    finally:
        proxy.stop()
    assert f"CONNECT 127.0.0.1:{reg.port} HTTP/1.1" in tinyproxy.requests()
