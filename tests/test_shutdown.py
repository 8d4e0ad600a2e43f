"""Graceful shutdown: SIGTERM lets in-flight transfers finish, and leaves nothing half-written."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp

from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyproc import ProxyProcess

MiB = 1 << 20


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
    assert os.listdir(data / "tmp") == []
    stored = data / "blobs" / "sha256" / d[7:9] / d[7:]
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
    assert os.listdir(data / "tmp") == []
    assert not (data / "blobs" / "sha256" / d[7:9] / d[7:]).exists()


async def test_sigkill_mid_fill_leaves_nothing_visible_and_restart_cleans_up(aiohttp_server,
                                                                             tmp_path):
    fake = FakeUpstream()
    fake.chunk_delay = 0.02
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    blob = os.urandom(4 * MiB)
    d = fake.add_blob(blob)
    data = tmp_path / "data"
    stored = data / "blobs" / "sha256" / d[7:9] / d[7:]
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
    assert os.listdir(data / "tmp")  # the half-written fill file is still there...
    proxy = ProxyProcess(tmp_path / "p2", "--upstream", up, "--data-dir", str(data)).start()
    try:
        assert os.listdir(data / "tmp") == []  # ...until the next start cleans it
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
