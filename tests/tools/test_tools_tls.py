"""``regproxy warm``/``export``/``import`` against a proxy serving real TLS with the CA of
``regproxy certs init`` (issue 17, item 15): ``--ca-file``, ``SSL_CERT_FILE``, ``--insecure``."""

from __future__ import annotations

import asyncio
import tarfile
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import main
from tests.support.edge import EdgeProxy, client_context
from tests.support.images import make_tar_layer, push_image
from tests.support.registry import RegistryProcess


def run(*argv: str) -> asyncio.Future[int]:
    return asyncio.ensure_future(asyncio.to_thread(main, list(argv)))


@pytest.fixture(scope="module")
def tls_proxy(tmp_path_factory: pytest.TempPathFactory, upstream_registry: RegistryProcess):
    work = tmp_path_factory.mktemp("tools-tls")
    assert main(["certs", "init", "--host", "localhost", "--ip", "127.0.0.1",
                 "--dir", str(work / "certs")]) == 0
    config = work / "config.toml"
    config.write_text(f"""
[storage]
root = "data"
[proxy]
default_upstream = "upstream.test"
[hosted]
repositories = ["team/**"]
[upstreams."upstream.test"]
url = "{upstream_registry.url}"
[tls]
cert = "certs/server.crt"
key = "certs/server.key"
""")
    proxy = EdgeProxy(work, config).start()
    try:
        yield proxy, work / "certs" / "ca.crt"
    finally:
        proxy.stop()


async def test_tools_verify_the_proxy_with_its_private_ca(tls_proxy, upstream_registry, http_session,
                                                          tmp_path, capsys, monkeypatch):
    proxy, ca = tls_proxy
    img = await push_image(http_session, upstream_registry.url, "tls/tool", "v1", [make_tar_layer(seed=951)])
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    common = ("--proxy", proxy.url, "--no-progress")

    assert await run("warm", "tls/tool:v1", *common) == 1  # the system's CAs do not know it
    err = capsys.readouterr().err
    assert "CERTIFICATE_VERIFY_FAILED" in err and "--ca-file" in err and "Traceback" not in err

    assert await run("warm", "tls/tool:v1", *common, "--ca-file", str(ca)) == 0
    assert "warmed 1 image(s)" in capsys.readouterr().out

    assert await run("warm", "tls/tool:v1", *common, "--insecure") == 0
    capsys.readouterr()

    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # what docs/operations.md documents for every tool
    out = tmp_path / "tool.tar"
    assert await run("export", "tls/tool:v1", "-o", str(out), *common) == 0
    monkeypatch.delenv("SSL_CERT_FILE")
    with tarfile.open(out) as tar:
        assert f"blobs/sha256/{img.digest[7:]}" in tar.getnames()

    assert await run("import", str(out), "--repo-prefix", "team/", *common, "--ca-file", str(ca)) == 0
    assert "pushed team/tls/tool:v1" in capsys.readouterr().out
    async with aiohttp.ClientSession() as s, s.get(
            f"{proxy.url}/v2/team/tls/tool/manifests/v1", ssl=client_context(ca),
            headers={"Accept": img.media_type}) as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == img.digest

    assert await run("warm", "tls/tool:v1", *common, "--ca-file", str(tmp_path / "none.crt")) == 2
    assert "--ca-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        main(["warm", "x", "--ca-file", str(ca), "--insecure"])


def test_the_operations_docs_document_ssl_cert_file():
    readme = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert "SSL_CERT_FILE" in readme and "--ca-file" in readme and "--insecure" in readme
