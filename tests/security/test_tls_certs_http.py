"""Issue 14, findings 5, 9 and 13: certificate rotation that never takes TLS down, key files
that cannot be exposed or redirected by a planted temp file, and malformed HTTP requests
answered with a short OCI error and one rate-limited log line."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import certs
from proxy.app import create_app
from proxy.tls import SSL_CONTEXT, TLSConfig
from tests.support.edge import client_context
from tests.support.proxyfix import make_config

DEAD_UPSTREAM = "http://127.0.0.1:9"


async def wait_until(cond: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Poll ``cond`` until it holds; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- finding 5: a new certificate without its key keeps the old pair serving ------------------

def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


async def served_certificate(port: int, ca: Path) -> bytes | None:
    """The certificate a verified handshake gets (``None`` when the handshake fails), once
    the server has answered a request on that connection."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca),
                                                       server_hostname="localhost")
    except (ssl.SSLError, OSError):
        return None
    try:
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        status_line = await reader.readline()
        if not status_line.startswith(b"HTTP/1.1 200 "):
            return None
        cert: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return cert
    except (ssl.SSLError, OSError):
        return None
    finally:
        writer.close()


async def test_certificate_written_before_its_key_keeps_the_old_pair(aiohttp_server, tmp_path, caplog):
    certdir = tmp_path / "certs"
    certs.init(certdir, ["localhost"], ["127.0.0.1"])
    old_der = der(certdir / "server.crt")
    tls = TLSConfig(cert=certdir / "server.crt", key=certdir / "server.key", reload_interval=0.05)
    app = create_app(make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM}, tls=tls))
    server = await aiohttp_server(app, ssl=app[SSL_CONTEXT])
    ca = certdir / "ca.crt"
    assert await served_certificate(server.port, ca) == old_der

    # a renewal tool writes the new certificate first; its key is not there yet
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    ca_key = serialization.load_pem_private_key((certdir / "ca.key").read_bytes(), password=None)
    new_cert, new_key = certs.issue(ca_cert, ca_key, ["localhost"], ["127.0.0.1"])  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="regproxy.tls")
    (certdir / "server.crt").write_bytes(new_cert.public_bytes(serialization.Encoding.PEM))

    async def refused() -> bool:
        return "TLS certificate not reloaded" in caplog.text

    await wait_until(refused, "the reloader to refuse the mismatched pair")
    for _ in range(3):  # the watcher keeps retrying; every handshake still gets the old pair
        assert await served_certificate(server.port, ca) == old_der

    # the matching key lands: the new pair is picked up
    (certdir / "server.key").write_bytes(new_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    new_der = new_cert.public_bytes(serialization.Encoding.DER)

    async def new_served() -> bool:
        return await served_certificate(server.port, ca) == new_der

    await wait_until(new_served, "the new certificate to be served")
