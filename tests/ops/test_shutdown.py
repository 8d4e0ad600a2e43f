"""Graceful shutdown: SIGTERM lets in-flight transfers finish, and leaves nothing half-written."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import urllib.request

import aiohttp
import pytest

from proxy.reference import Digest
from proxy.storage import BlobWriter
from proxy.storage.backend import open_filesystem
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyproc import ProxyProcess
from tests.support.store import blob_path, tmp_files

MiB = 1 << 20
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


async def test_sigterm_finishes_in_flight_transfers(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    fake.chunk_delay = 0.01  # 2 MiB at 64 KiB per 10 ms: ~0.3 s
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    blob = os.urandom(2 * MiB)
    d = fake.add_blob(blob)
    data = tmp_path / "data"
    proxy = ProxyProcess(tmp_path / "p", "--upstream", up, "--data-dir", str(data)).start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{proxy.url}/v2/x/blobs/{d}") as r:
                head = await r.content.readexactly(128 * 1024)
                assert proxy.proc is not None
                proxy.proc.send_signal(signal.SIGTERM)
                rest = await r.read()
            assert head + rest == blob
        assert proxy.proc is not None
        assert await asyncio.to_thread(proxy.proc.wait, 40) == 0
    finally:
        proxy.stop()
    assert tmp_files(data) == []
    stored = blob_path(data, d)
    assert not stored.exists() or stored.read_bytes() == blob


async def test_sigterm_mid_fill_without_clients_leaves_no_partial_object(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    fake.chunk_delay = 0.05  # a fill far slower than the shutdown
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    d = fake.add_blob(os.urandom(8 * MiB))
    data = tmp_path / "data"
    proxy = ProxyProcess(tmp_path / "p", "--upstream", up, "--data-dir", str(data)).start()
    try:
        async with aiohttp.ClientSession() as client:
            r = await client.get(f"{proxy.url}/v2/x/blobs/{d}")
            await r.content.readexactly(64 * 1024)
            r.close()  # the client leaves; the fill goes on in the background
            await asyncio.sleep(0.1)
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proxy.proc.wait, 40) == 0
    finally:
        proxy.stop()
    assert tmp_files(data) == []
    assert not blob_path(data, d).exists()


async def test_sigkill_mid_fill_leaves_nothing_visible_and_restart_cleans_up(aiohttp_server,
                                                                             tmp_path):
    fake = FakeUpstream()
    fake.chunk_delay = 0.02
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    blob = os.urandom(4 * MiB)
    d = fake.add_blob(blob)
    data = tmp_path / "data"
    stored = blob_path(data, d)
    proxy = ProxyProcess(tmp_path / "p", "--upstream", up, "--data-dir", str(data)).start()
    try:
        async with aiohttp.ClientSession() as client:
            r = await client.get(f"{proxy.url}/v2/x/blobs/{d}")
            await r.content.readexactly(256 * 1024)
            assert proxy.proc is not None
            proxy.proc.kill()  # a crash: no cleanup code runs
            await asyncio.to_thread(proxy.proc.wait, 10)
            r.close()
    finally:
        proxy.stop()
    assert not stored.exists()  # nothing partial became visible
    assert tmp_files(data)  # the half-written fill file is still there...
    proxy = ProxyProcess(tmp_path / "p2", "--upstream", up, "--data-dir", str(data)).start()
    try:
        assert tmp_files(data) == []  # ...until the next start cleans it
        fake.chunk_delay = 0
        async with aiohttp.ClientSession() as client, client.get(
                f"{proxy.url}/v2/x/blobs/{d}") as r:
            assert await r.read() == blob
    finally:
        proxy.stop()


async def test_sighup_without_tls_keeps_every_process_and_transfer(aiohttp_server, tmp_path):
    """Log rotation sends SIGHUP: without TLS there is nothing to reload, and neither the
    single process nor the workers may die of it (its default action), nor a transfer."""
    fake = FakeUpstream()
    fake.chunk_delay = 0.01
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    blob = os.urandom(2 * MiB)
    d = fake.add_blob(blob)
    for workers in ("1", "2"):
        proxy = ProxyProcess(tmp_path / f"p{workers}", "--upstream", up, "--data-dir",
                             str(tmp_path / f"data{workers}"), "--workers", workers).start()
        try:
            assert proxy.proc is not None
            async with aiohttp.ClientSession() as client:
                async with client.get(f"{proxy.url}/v2/x/blobs/{d}") as r:
                    head = await r.content.readexactly(128 * 1024)
                    proxy.proc.send_signal(signal.SIGHUP)
                    await asyncio.sleep(0.3)
                    assert head + await r.read() == blob
                async with client.get(f"{proxy.url}/v2/") as r:
                    assert r.status == 200
            assert proxy.proc.poll() is None
            assert "exited" not in proxy.log_tail()  # no worker died and was restarted
        finally:
            proxy.stop()


def _push_blob(url: str, repo: str, blob: bytes) -> str:
    """Push ``blob`` to a hosted repository in one monolithic POST; its digest."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    req = urllib.request.Request(f"{url}/v2/{repo}/blobs/uploads/?digest={digest}", data=blob,
                                 method="POST", headers={"Content-Type": "application/octet-stream"})
    with _OPENER.open(req, timeout=30) as resp:
        assert resp.status == 201
    return digest


def _stalled_download(port: int, path: str) -> socket.socket:
    """A client that reads a response's first bytes, then nothing: a tiny receive buffer
    keeps the transfer from ever completing while it does not read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    sock.settimeout(30)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def _drain(sock: socket.socket) -> int:
    """Read what is left until the server closes or resets the connection; bytes read."""
    got = 0
    try:
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return got


@pytest.mark.timeout(90)
def test_sigterm_cuts_transfers_after_shutdown_grace_single_and_workers(tmp_path):
    """``server.shutdown_grace`` bounds the whole wait: a transfer that cannot finish (a
    stalled client) is cut once the grace is over, in one process and with workers (aiohttp's
    own shutdown waited twice the grace, and longer while the client did not read)."""
    grace, margin = 6, 4  # the exit must come before twice the grace
    blob = os.urandom(32 * MiB)
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nshutdown_grace = "{grace}s"\n')
    procs = [ProxyProcess(tmp_path / f"w{n}", "--config", str(config), "--data-dir",
                          str(tmp_path / f"data{n}"), "--hosted", "team/*", "--workers", n)
             for n in ("1", "2")]
    try:
        clients = []
        for proxy in procs:
            proxy.start()
            digest = _push_blob(proxy.url, "team/big", blob)
            clients.append(_stalled_download(proxy.port, f"/v2/team/big/blobs/{digest}"))
        for proxy in procs:
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGTERM)
        for proxy in procs:
            assert proxy.proc is not None
            try:
                code = proxy.proc.wait(grace + margin)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {grace + margin} s after SIGTERM:\n{proxy.log_tail()}")
            assert code == 0, proxy.log_tail()
            log = proxy.log_tail(200)
            assert "waiting up to 6 s for 1 request(s) in flight" in log
            assert "cut 1 transfer(s)" in log
        for sock in clients:
            assert _drain(sock) < len(blob)  # cut, not completed
    finally:
        for proxy in procs:
            proxy.stop()


def test_start_up_removes_writer_leftovers_nobody_holds_and_keeps_live_ones(tmp_path):
    """What a killed or out-of-space writer left in ``tmp/`` goes at the next start however
    young it is, while what a live process (a sibling worker, a replica on the same store)
    is writing stays: fill files, size hints, readiness probes and object temp files are
    held by their writer's ``flock`` (or belong to a fill that is)."""
    data = tmp_path / "data"
    _, store = open_filesystem(data)
    tmp = store.tmp_dir
    dead = Digest.of(b"dead fill")
    leftovers = [tmp / f"{dead.algorithm}-{dead.hex}.size.0badc0de",  # announce_size's temp
                 tmp / f"{dead.algorithm}-{dead.hex}.size",
                 tmp / "ready-0123456789ab",  # a readiness probe that hit ENOSPC
                 tmp / f"{'ab' * 12}.part", tmp / f"{'cd' * 12}.meta"]
    for path in leftovers:
        path.write_bytes(b"")  # young: the old rule kept them for 600 s
    live = Digest.of(b"live fill")
    fill = store.claim_fill(live)  # this process plays a sibling that is filling right now
    assert fill is not None
    fill.announce_size(123)
    live_size_temp = tmp / f"{live.algorithm}-{live.hex}.size.feedf00d"
    live_size_temp.write_bytes(b"")
    writer = BlobWriter(store.tmp_dir)  # an object being written by the live sibling
    probe = tmp / "ready-5ca1ab1e0000"  # and a readiness probe it is writing (held as
    probe_fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # probe_writable does)
    fcntl.flock(probe_fd, fcntl.LOCK_EX)
    try:
        proxy = ProxyProcess(tmp_path / "p", "--data-dir", str(data), "--workers", "2").start()
        proxy.stop()
        left = set(os.listdir(tmp))
        assert not left & {p.name for p in leftovers}
        assert {store.fill_path(live).name, live_size_temp.name, f"{live.algorithm}-{live.hex}.size",
                writer.path.name, probe.name} <= left
    finally:
        fill.abort()
        writer.abort()
        probe.unlink()
        os.close(probe_fd)
    assert os.listdir(tmp) == [live_size_temp.name]  # (the test's own stand-in, left as is)


def test_size_hint_and_readiness_probe_leave_nothing_when_the_disk_is_full(tmp_path, monkeypatch):
    _, store = open_filesystem(tmp_path)
    fill = store.claim_fill(Digest.of(b"x"))
    assert fill is not None

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        fill.announce_size(1)
    assert store.probe_writable() == os.strerror(errno.ENOSPC)
    monkeypatch.undo()
    assert os.listdir(store.tmp_dir) == [store.fill_path(Digest.of(b"x")).name]
    assert store.probe_writable() is None
    fill.abort()
    assert os.listdir(store.tmp_dir) == []
