"""BlobResponse on its own: each body description over plain TCP (sendfile) and TLS (read
and written), conditional requests, ranges, and a failed transfer cutting the connection."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy import certs
from proxy.errors import BadGateway
from proxy.handlers import blobresponse
from proxy.handlers.blobresponse import BlobResponse, Body, ByteStream, LocalSpans, Redirect
from proxy.handlers.common import CACHE_OUTCOME, ERROR, oci
from proxy.results import LocalSpan
from tests.support.edge import client_context

ETAG = '"sha256:' + "ab" * 32 + '"'
HEADERS = {"ETag": ETAG, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}


class GrowingFile:
    """A file that is appended to while it is served, like a fill's temp file; its spans
    come as bytes land."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT)
        self.written = 0
        self._grew = asyncio.Event()

    def append(self, data: bytes) -> None:
        os.write(self.fd, data)
        self.written += len(data)
        self._grew.set()

    async def spans(self, start: int, end: int | None) -> AsyncIterator[LocalSpan]:
        assert end is not None
        pos = start
        while pos < end:
            if self.written > pos:
                n = min(self.written, end) - pos
                yield LocalSpan(self.fd, pos, n)
                pos += n
                continue
            self._grew.clear()
            await self._grew.wait()


class Served:
    """``await serve(body, size)``: the URL of a server answering every request with a
    BlobResponse of ``body()``. ``sent``: what each ``os.sendfile`` call sent; ``requests``:
    the requests served (their access-log notes); ``ssl``: the client's context."""

    def __init__(self, aiohttp_server, server_ctx: ssl.SSLContext | None,
                 client_ctx: ssl.SSLContext | None) -> None:
        self._aiohttp_server = aiohttp_server
        self._server_ctx = server_ctx
        self.ssl = client_ctx
        self.tls = client_ctx is not None
        self.sent: list[int] = []
        self.requests: list[web.Request] = []

    async def __call__(self, body: Callable[[], Body | None], size: int | None) -> str:
        async def handler(req: web.Request) -> web.StreamResponse:
            req[CACHE_OUTCOME] = "hit"
            self.requests.append(req)
            return await BlobResponse(dict(HEADERS), size, body()).send(req)

        app = web.Application()
        app.router.add_route("*", "/blob", oci(handler))
        server = await self._aiohttp_server(app, ssl=self._server_ctx)
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{server.port}/blob"


@pytest.fixture(params=["plain", "tls"])
async def serve(request, aiohttp_server, tmp_path, monkeypatch) -> Served:
    server_ctx = client_ctx = None
    if request.param == "tls":
        paths = certs.init(tmp_path / "certs", ["localhost"], ["127.0.0.1"])
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(paths.cert, paths.key)
        client_ctx = client_context(paths.ca_cert)
    served = Served(aiohttp_server, server_ctx, client_ctx)
    real_sendfile = os.sendfile

    def counting_sendfile(out: int, fd: int, offset: int, count: int) -> int:
        sent = real_sendfile(out, fd, offset, count)
        served.sent.append(sent)
        return sent

    monkeypatch.setattr(blobresponse.os, "sendfile", counting_sendfile)
    return served


@pytest.fixture
def stored(tmp_path):
    """A stored blob: ``(fd, bytes)``."""
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


async def test_a_stored_file_goes_with_sendfile_on_plain_tcp_and_read_on_tls(serve, stored):
    fd, data = stored
    url = await serve(lambda: LocalSpan(fd, 0, len(data)), len(data))
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=serve.ssl) as r:
            assert r.status == 200 and r.content_length == len(data)
            assert await r.read() == data
        async with s.get(url, ssl=serve.ssl, headers={"Range": "bytes=1000-"}) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
            assert await r.read() == data[1000:]
        async with s.head(url, ssl=serve.ssl) as r:
            assert r.status == 200 and r.content_length == len(data) and await r.read() == b""
    assert (sum(serve.sent) == 2 * len(data) - 1000) if not serve.tls else not serve.sent


async def test_if_none_match_naming_the_etag_is_a_304_without_a_body(serve, stored):
    fd, data = stored
    url = await serve(lambda: LocalSpan(fd, 0, len(data)), len(data))
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "HEAD"):
            async with s.request(method, url, ssl=serve.ssl,
                                 headers={"If-None-Match": ETAG, "Range": "bytes=5-9"}) as r:
                assert r.status == 304 and r.headers["ETag"] == ETAG and await r.read() == b""
        async with s.get(url, ssl=serve.ssl, headers={"If-None-Match": '"other"'}) as r:
            assert r.status == 200 and await r.read() == data


async def test_an_unsatisfiable_range_is_the_oci_416_and_nothing_else_is_sent(serve, stored):
    fd, data = stored
    url = await serve(lambda: LocalSpan(fd, 0, len(data)), len(data))
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "HEAD"):
            for rng in (f"bytes={len(data)}-", "bytes=0-1,5-6", "bytes=-0"):
                async with s.request(method, url, ssl=serve.ssl, headers={"Range": rng}) as r:
                    assert r.status == 416, rng
                    assert r.headers["Content-Range"] == f"bytes */{len(data)}"
                    if method == "GET":
                        assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert not serve.sent


async def test_a_range_of_a_growing_file_is_sent_as_its_bytes_land(serve, tmp_path):
    """A file still being written (a fill): the response starts before the range's bytes
    are there and ends with the range's last byte."""
    data = os.urandom(2 << 20)
    grow = GrowingFile(tmp_path / "fill")
    grow.append(data[:1000])
    url = await serve(lambda: LocalSpans(grow.spans), len(data))

    async def feed() -> None:
        for pos in range(1000, len(data), 256 << 10):
            await asyncio.sleep(0.005)
            grow.append(data[pos:pos + (256 << 10)])

    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=serve.ssl, headers={"Range": "bytes=500-1500000"}) as r:
            assert r.status == 206 and r.content_length == 1500000 - 500 + 1
            assert r.headers["Content-Range"] == f"bytes 500-1500000/{len(data)}"
            first = await r.content.readexactly(500)  # (there before the feed starts)
            assert first == data[500:1000]
            feeding = asyncio.create_task(feed())
            assert first + await r.read() == data[500:1500001]
        await feeding
    os.close(grow.fd)
    assert bool(serve.sent) != serve.tls


async def test_a_growing_file_of_unknown_size_is_sent_chunked(serve, tmp_path):
    data = os.urandom(100_000)
    grow = GrowingFile(tmp_path / "fill")
    grow.append(data)

    async def spans(start: int, end: int | None) -> AsyncIterator[LocalSpan]:
        async for span in grow.spans(start, len(data)):
            yield span

    url = await serve(lambda: LocalSpans(spans), None)
    async with aiohttp.ClientSession() as s, s.get(url, ssl=serve.ssl) as r:
        assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
        assert await r.read() == data
    os.close(grow.fd)
    assert not serve.sent  # (a chunked body needs framing: copied)


async def test_a_byte_stream_and_a_redirect(serve):
    data = os.urandom(70_000)

    async def chunks(start: int, end: int | None) -> AsyncIterator[bytes]:
        for pos in range(start, end or len(data), 10_000):
            yield data[pos:min(pos + 10_000, end or len(data))]

    url = await serve(lambda: ByteStream(chunks), len(data))
    redirect = await serve(lambda: Redirect("https://objects.example/blob?sig=1"), len(data))
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=serve.ssl, headers={"Range": "bytes=-25000"}) as r:
            assert r.status == 206 and await r.read() == data[-25000:]
        async with s.get(redirect, ssl=serve.ssl, allow_redirects=False) as r:
            assert r.status == 307 and r.headers["Location"] == "https://objects.example/blob?sig=1"
            assert r.content_length == 0


@pytest.mark.parametrize("kind", ["spans", "bytes"])
async def test_an_error_after_the_headers_cuts_the_connection_and_says_why(serve, stored, kind):
    """The client sees a short body (never a complete-looking one), and the access log
    gets the outcome and the reason."""
    fd, data = stored

    async def spans(start: int, end: int | None) -> AsyncIterator[LocalSpan]:
        yield LocalSpan(fd, start, 1000)
        raise BadGateway("upstream content failed verification: digest mismatch")

    async def chunks(start: int, end: int | None) -> AsyncIterator[bytes]:
        yield data[:1000]
        raise BadGateway("upstream content failed verification: digest mismatch")

    url = await serve(lambda: LocalSpans(spans) if kind == "spans" else ByteStream(chunks),
                      len(data))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):  # (not a timeout: the cut is seen)
            async with s.get(url, ssl=serve.ssl, timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 200
                await r.read()
    note = serve.requests[0]
    assert note[CACHE_OUTCOME] == "upstream_error"
    assert note[ERROR] == "transfer cut: upstream content failed verification: digest mismatch"


async def test_a_client_whose_socket_stays_full_gets_every_byte_in_order(serve, tmp_path):
    """sendfile while the socket has room, a little through the transport while it is
    full: a slow reader with a small receive buffer still gets the exact file."""
    data = os.urandom(12 << 20)  # (more than the kernel's send buffer takes)
    path = tmp_path / "big"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    url = await serve(lambda: LocalSpan(fd, 0, len(data)), len(data))
    host, port = url.split("//")[1].split("/")[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(
        sock=sock, limit=1 << 16, ssl=serve.ssl, server_hostname="127.0.0.1" if serve.tls else None)
    writer.write(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(data)}".encode() in head
    body = bytearray()
    while len(body) < len(data):
        body += await reader.read(32 << 10)
        await asyncio.sleep(0.0005)  # slower than the server: the socket stays full
    writer.close()
    os.close(fd)
    assert bytes(body) == data
    assert (sum(serve.sent) < len(data)) if not serve.tls else not serve.sent
