"""Issue 14, findings 5, 9 and 13: certificate rotation that never takes TLS down, key files
that cannot be exposed or redirected by a planted temp file, and malformed HTTP requests
answered with a short OCI error and one rate-limited log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import certs
from proxy.app import create_app
from proxy.auth.htpasswd import update_htpasswd
from proxy.auth.tokens import load_or_create_key
from proxy.cli import main
from proxy.settings.tls import TLSConfig
from proxy.tls import SSL_CONTEXT
from tests.support.edge import client_context
from tests.support.proxyfix import make_config
from tests.support.proxyproc import ProxyProcess

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
    ca_cert, ca_key, _created = certs.load_or_create_ca(certdir)
    new_cert, new_key = certs.issue(ca_cert, ca_key, ["localhost"], ["127.0.0.1"])
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


# -- finding 9: key files written through a temp name an attacker may have planted -------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.parametrize("planted", ["world-readable file", "symlink"])
def test_certs_init_ignores_planted_temp_files(tmp_path, planted, capsys):
    certdir = tmp_path / "certs"
    certdir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("do not touch\n")
    victim.chmod(0o644)
    names = (".server.key.tmp", ".ca.key.tmp", ".server.crt.tmp", ".ca.crt.tmp")
    for name in names:
        tmp = certdir / name
        if planted == "symlink":
            tmp.symlink_to(victim)
        else:
            tmp.write_text("")
            tmp.chmod(0o644)

    assert main(["certs", "init", "--dir", str(certdir), "--host", "localhost"]) == 0
    capsys.readouterr()
    for key in ("server.key", "ca.key"):
        assert mode(certdir / key) == 0o600, key
        assert not (certdir / key).is_symlink()
        serialization.load_pem_private_key((certdir / key).read_bytes(), password=None)
    for cert in ("server.crt", "ca.crt"):
        assert not (certdir / cert).is_symlink()
        x509.load_pem_x509_certificate((certdir / cert).read_bytes())
    assert victim.read_text() == "do not touch\n"
    assert mode(victim) == 0o644
    # no key material is left in or behind a temp file
    for p in certdir.iterdir():
        if p.name not in names:
            assert not p.name.startswith("."), p.name


def test_secret_files_are_0600_whatever_the_umask(tmp_path):
    """The token signing key and the htpasswd file are written atomically, mode 0600."""
    old = os.umask(0)
    try:
        key_path = tmp_path / "certs" / "token.key"
        load_or_create_key(key_path)
        assert mode(key_path) == 0o600
        first = load_or_create_key(key_path).private_numbers()
        assert load_or_create_key(key_path).private_numbers() == first
        ht = tmp_path / "htpasswd"
        assert update_htpasswd(ht, "alice", "$2b$04$" + "a" * 53)
        assert mode(ht) == 0o600
        ht.chmod(0o644)  # an existing file keeps its group read, never world read
        assert update_htpasswd(ht, "bob", "$2b$04$" + "b" * 53)
        assert mode(ht) == 0o640
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs", "htpasswd"]
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["token.key"]


def test_token_key_created_once_when_workers_race(tmp_path):
    """Workers starting together on a fresh data directory: none reads a half-written key or
    fails because another created it first, and all end up with the same key."""
    key_path = tmp_path / "token.key"
    start = threading.Barrier(8)

    def worker(_: int) -> int:
        start.wait()
        return load_or_create_key(key_path).private_numbers().private_value

    for _round in range(5):
        with contextlib.suppress(FileNotFoundError):
            key_path.unlink()
        with ThreadPoolExecutor(8) as pool:
            keys = list(pool.map(worker, range(8)))
        assert len(set(keys)) == 1
        assert mode(key_path) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["token.key"]


# -- finding 13: malformed HTTP requests -----------------------------------------------------

SECRET = "S3cr3tCredentialXYZ"
MALFORMED = {
    "over-long Authorization": (f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {SECRET}"
                                + "A" * 9000 + "\r\n\r\n").encode(),
    "control character in a header": (f"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Note: a\x01{SECRET}"
                                      "\r\n\r\n").encode(),
    "9,000-character path": f"GET /v2/{SECRET}{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "bad Content-Length": f"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 12{SECRET}\r\n\r\n".encode(),
    "more than 64 headers": ("GET /v2/ HTTP/1.1\r\nHost: x\r\n"
                             + "".join(f"X-{i}: {SECRET}\r\n" for i in range(70)) + "\r\n").encode(),
}


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a fresh connection; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def plain_proxy(tmp_path_factory) -> Iterator[ProxyProcess]:
    work = tmp_path_factory.mktemp("malformed")
    with ProxyProcess(work, "--upstream", DEAD_UPSTREAM, "--data-dir", str(work / "data")) as proxy:
        yield proxy


def log_text(proxy: ProxyProcess) -> str:
    return proxy.log_path.read_text(errors="replace")


ONE = re.compile(r"refused a malformed HTTP request from ")
MORE = re.compile(r"refused (\d+) more malformed HTTP requests")


def accounted(log: str) -> int:
    """Malformed requests the log accounts for: one per report line, plus suppressed counts."""
    return len(ONE.findall(log)) + sum(int(n) for n in MORE.findall(log))


async def send_and_wait_for_log(proxy: ProxyProcess, requests: list[bytes]) -> str:
    """Send each request on its own connection, check the 400s, and return the log lines
    they produced once all of them are accounted for."""
    before = len(log_text(proxy))
    for raw in requests:
        status, headers, body = await asyncio.to_thread(exchange, proxy.port, raw)
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert headers.get("server") == "regproxy"
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
        assert SECRET not in body.decode(errors="replace")

    async def all_accounted() -> bool:
        return accounted(log_text(proxy)[before:]) >= len(requests)

    await wait_until(all_accounted, "every malformed request to be accounted for in the log")
    log = log_text(proxy)[before:]
    assert accounted(log) == len(requests), log
    return log


async def test_malformed_requests_get_an_oci_400_and_a_short_log_line(plain_proxy):
    log = await send_and_wait_for_log(plain_proxy, list(MALFORMED.values()))
    assert "Traceback" not in log and "ERROR" not in log, log
    assert SECRET not in log, log
    assert "method=UNKNOWN" not in log, log  # no access-log line for each of them either
    lines = [line for line in log.splitlines() if " regproxy.access " not in line]
    assert lines and all(" WARNING " in line and len(line) < 200 for line in lines), log
    # the server goes on answering well-formed requests
    status, _headers, _body = await asyncio.to_thread(
        exchange, plain_proxy.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200


async def test_a_flood_of_malformed_requests_logs_a_bounded_number_of_lines(plain_proxy):
    kinds = list(MALFORMED.values())
    started = time.monotonic()
    log = await send_and_wait_for_log(plain_proxy, [kinds[i % len(kinds)] for i in range(300)])
    seconds = time.monotonic() - started
    # at most one report and one summary per second of flood
    assert len(log.splitlines()) <= 2 * (int(seconds) + 2), log
    assert "Traceback" not in log and SECRET not in log
