"""The edge over real TLS: skopeo (verification on) through a proxy process to docker-registry,
credentials, anonymous namespaces, a wrong CA, and certificate reload during a transfer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest

from proxy import certs
from tests.support.edge import EdgeProxy, client_context, write_htpasswd
from tests.support.images import make_layer_file, make_tar_layer, push_image
from tests.support.registry import RegistryProcess
from tests.support.skopeo import SkopeoError, read_oci_layout_index, skopeo_copy, skopeo_inspect

MiB = 1 << 20


def ca_only_dir(ca_crt: Path, where: Path) -> Path:
    """A --cert-dir for skopeo: only ``ca.crt`` (a stray ``*.key`` would be read as a client key)."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca_crt, where / "ca.crt")
    return where


def write_config(path: Path, registry: RegistryProcess, certdir: Path, htpasswd: Path | None,
                 extra: str = "") -> Path:
    auth = "" if htpasswd is None else f"""
[auth]
htpasswd = "{htpasswd.name}"
realm = "edge-test"
anonymous_pull = ["library/*"]

[[auth.rules]]
users = ["alice"]
repositories = ["edge/**"]
actions = ["pull"]
"""
    path.write_text(f"""
[storage]
root = "data"

[proxy]
default_upstream = "upstream.test"

[upstreams."upstream.test"]
url = "{registry.url}"
connect_timeout = 2
read_timeout = 10

[tls]
cert = "{certdir.name}/server.crt"
key = "{certdir.name}/server.key"
{extra}
{auth}""")
    return path


@pytest.fixture(scope="module")
def edge_env(tmp_path_factory, upstream_registry):
    """A TLS + htpasswd proxy process in front of the session's docker-registry."""
    work = tmp_path_factory.mktemp("edge-tls")
    certdir = work / "certs"
    certs.init(certdir, ["localhost"], ["127.0.0.1"])
    htpasswd = write_htpasswd(work / "htpasswd", {"alice": "wonderland"})
    cfg = write_config(work / "config.toml", upstream_registry, certdir, htpasswd)
    proxy = EdgeProxy(work, cfg).start()
    try:
        yield work, certdir, proxy
    finally:
        proxy.stop()


async def test_skopeo_pulls_with_verified_tls_and_credentials(edge_env, upstream_registry,
                                                              http_session, tmp_path):
    _work, certdir, proxy = edge_env
    img = await push_image(http_session, upstream_registry.url, "edge/app", "v1",
                           [make_tar_layer(seed=901)], schema="oci")
    cadir = ca_only_dir(certdir / "ca.crt", tmp_path / "ca")
    out = tmp_path / "oci"
    await skopeo_copy(f"docker://{proxy.host}/edge/app:v1", f"oci:{out}", "--src-tls-verify=true",
                      "--src-cert-dir", str(cadir), "--preserve-digests", src_creds="alice:wonderland")
    assert read_oci_layout_index(out)["manifests"][0]["digest"] == img.digest

    # the same pull without credentials, or with a wrong password, is refused
    for creds in (None, "alice:wrong"):
        with pytest.raises(SkopeoError) as err:
            await skopeo_inspect(f"docker://{proxy.host}/edge/app:v1", False, "--tls-verify=true",
                                 "--cert-dir", str(cadir), creds=creds)
        assert "401" in err.value.stderr or "unauthorized" in err.value.stderr.lower()
    log = proxy.log_tail(200)
    assert "wonderland" not in log and "Authorization" not in log


async def test_anonymous_pull_on_one_namespace_only(edge_env, upstream_registry, http_session, tmp_path):
    _work, certdir, proxy = edge_env
    await push_image(http_session, upstream_registry.url, "library/edgeanon", "v1",
                     [make_tar_layer(seed=902)])
    await push_image(http_session, upstream_registry.url, "private/edgeanon", "v1",
                     [make_tar_layer(seed=903)])
    cadir = ca_only_dir(certdir / "ca.crt", tmp_path / "ca")
    verify = ("--tls-verify=true", "--cert-dir", str(cadir))
    info = await skopeo_inspect(f"docker://{proxy.host}/library/edgeanon:v1", False, *verify)
    assert info["Digest"].startswith("sha256:")
    with pytest.raises(SkopeoError):
        await skopeo_inspect(f"docker://{proxy.host}/private/edgeanon:v1", False, *verify)
    # alice's rule covers edge/** only; a signed-in user without a rule gets 403, not 401
    async with aiohttp.ClientSession() as s, s.get(
            f"{proxy.url}/v2/private/edgeanon/manifests/v1", ssl=client_context(certdir / "ca.crt"),
            headers={"Authorization": "Basic " + base64.b64encode(b"alice:wonderland").decode()}) as r:
        assert r.status == 403
        assert (await r.json())["errors"][0]["code"] == "DENIED"


async def test_wrong_ca_is_refused(edge_env, tmp_path):
    _work, _certdir, proxy = edge_env
    other = tmp_path / "other"
    certs.init(other, ["localhost"], ["127.0.0.1"])
    cadir = ca_only_dir(other / "ca.crt", tmp_path / "ca")
    with pytest.raises(SkopeoError) as err:
        await skopeo_inspect(f"docker://{proxy.host}/library/whatever:v1", False, "--tls-verify=true",
                             "--cert-dir", str(cadir))
    assert "certificate" in err.value.stderr.lower() or "x509" in err.value.stderr
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/v2/",
                                                       ssl=client_context(other / "ca.crt")):
            pass


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_below_1_2_is_refused(edge_env):
    _work, certdir, proxy = edge_env
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certdir / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/v2/", ssl=ctx):
            pass


async def test_certificate_reload_keeps_running_transfer(upstream_registry, http_session, tmp_path):
    """SIGHUP with new files: the transfer in flight completes on the old certificate, new
    connections get the new one (trusted only by the new CA)."""
    blob_path = tmp_path / "big.bin"
    digest, size = make_layer_file(blob_path, 24 * MiB, seed=77)
    await push_image(http_session, upstream_registry.url, "reload/big", "v1", [blob_path])
    certdir = tmp_path / "certs"
    certs.init(certdir, ["localhost"], ["127.0.0.1"])
    old_ca = tmp_path / "old-ca.crt"
    shutil.copy(certdir / "ca.crt", old_ca)
    cfg = write_config(tmp_path / "config.toml", upstream_registry, certdir, None,
                       extra="reload_interval = 0")
    new = tmp_path / "new"
    certs.init(new, ["localhost"], ["127.0.0.1"])

    with EdgeProxy(tmp_path / "p", cfg) as proxy:
        url = f"{proxy.url}/v2/reload/big/blobs/{digest}"
        async with aiohttp.ClientSession(read_bufsize=64 * 1024) as old_session:
            resp = await old_session.get(url, ssl=client_context(old_ca))
            assert resp.status == 200
            h = hashlib.sha256()
            h.update(await resp.content.readexactly(1 * MiB))

            # rotate: new key and certificate from another CA, then SIGHUP
            shutil.copy(new / "server.key", certdir / "server.key")
            shutil.copy(new / "server.crt", certdir / "server.crt")
            assert proxy.proc is not None
            os.kill(proxy.proc.pid, signal.SIGHUP)

            async def new_handshake_works() -> bool:
                try:
                    async with aiohttp.ClientSession() as s, s.get(
                            f"{proxy.url}/v2/", ssl=client_context(new / "ca.crt")) as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            for _ in range(100):
                if await new_handshake_works():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"the new certificate was not served:\n{proxy.log_tail()}")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/v2/",
                                                               ssl=client_context(old_ca)):
                    pass

            # the old transfer is still alive and completes intact
            while chunk := await resp.content.read(1 * MiB):
                h.update(chunk)
            resp.release()
        assert f"sha256:{h.hexdigest()}" == digest
        assert "TLS certificate reloaded" in proxy.log_tail(100)
    assert size == 24 * MiB


async def test_mutual_tls_and_mtime_reload(aiohttp_server, tmp_path):
    """``client_ca``: no client certificate, no connection; the watcher picks up new files."""
    from proxy.app import create_app
    from proxy.settings.tls import TLSConfig
    from proxy.tls import SSL_CONTEXT, CertReloader
    from tests.support.proxyfix import make_config

    certdir = tmp_path / "certs"
    certs.init(certdir, ["localhost"], ["127.0.0.1"])
    client_cert, client_key = certs.issue_client(certdir, "ci")
    tls = TLSConfig(cert=certdir / "server.crt", key=certdir / "server.key",
                    client_ca=certdir / "ca.crt", reload_interval=0)
    app = create_app(make_config(tmp_path / "data", {"docker.io": "http://127.0.0.1:9"}, tls=tls))
    server = await aiohttp_server(app, ssl=app[SSL_CONTEXT])
    url = f"https://127.0.0.1:{server.port}/v2/"
    with_cert = client_context(certdir / "ca.crt")
    with_cert.load_cert_chain(str(client_cert), str(client_key))
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=with_cert) as r:
            assert r.status == 200
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        with pytest.raises(aiohttp.ClientError):
            async with s.get(url, ssl=client_context(certdir / "ca.crt")) as r:
                await r.read()

    reloader = CertReloader(tls, app[SSL_CONTEXT])
    assert reloader.reload() is False  # nothing changed
    certs.init(certdir, ["localhost"], ["127.0.0.1"])  # same CA, new server certificate
    assert reloader.reload() is True
    (certdir / "server.key").write_text("garbage")  # a broken rotation keeps the old certificate
    assert reloader.reload() is False
    async with aiohttp.ClientSession() as s, s.get(url, ssl=with_cert) as r:
        assert r.status == 200
