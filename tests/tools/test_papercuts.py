"""Operator papercuts of issue 17 (item 16): `cache ls`/`purge`/`gc` on the command line,
purges reaching running workers, and what the warm/export/import tools print."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.cli import _build_parser, main
from proxy.tools import commands
from proxy.tools import warm as warm_module
from proxy.tools.client import RegistryClient, ToolError
from proxy.tools.progress import Progress
from proxy.tools.warm import warm
from proxy.units import human_size
from tests.support.images import make_random_bytes, make_tar_layer, push_image
from tests.support.proxyfix import make_config
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import RegistryProcess
from tests.support.store import blob_path

UNITS = re.compile(r"\d(?:\.\d)? (?:B|KiB|MiB|GiB)\b")


def write_config(path: Path, reg: RegistryProcess, data: Path, *cache: str) -> Path:
    lines = ["[storage]", f'root = "{data}"', "[cache]", *cache, "[proxy]",
             'default_upstream = "upstream.test"', "[hosted]", 'repositories = ["team/*"]',
             '[upstreams."upstream.test"]', f'url = "{reg.url}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def layer(seed: int, size: int) -> object:
    return make_tar_layer({"big": make_random_bytes(size, seed)}, seed=seed)


def cli(*argv: str) -> Awaitable[int]:
    """``regproxy ...`` in a thread: it runs its own event loop."""
    return asyncio.to_thread(main, list(argv))


def test_human_sizes_use_binary_units():
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB"]


def test_cache_commands_refuse_a_directory_that_is_not_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["cache", "ls"], ["gc", "--dry-run"], ["cache", "purge", "x/y:1"],
                 ["cache", "ls", "--data-dir", str(tmp_path / "elsewhere")]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a regproxy store" in err, (argv, err)
    assert not (tmp_path / "data").exists() and not (tmp_path / "elsewhere").exists()


async def test_cache_ls_sizes_and_purges(aiohttp_server, upstream_registry, http_session, tmp_path,
                                         capsys):
    reg = upstream_registry
    big = await push_image(http_session, reg.url, "cut/big", "v1", [layer(501, 300_000)])
    await push_image(http_session, reg.url, "cut/big", "v2", [make_tar_layer(seed=502)])
    data = tmp_path / "data"
    server = await aiohttp_server(create_app(make_config(data, {"upstream.test": reg.url})))
    base = f"http://127.0.0.1:{server.port}"
    for tag in ("v1", "v2"):
        report = await warm([f"cut/big:{tag}"], base)
        assert report.ok, report.failed
    config = write_config(tmp_path / "c.toml", reg, data)

    assert await cli("cache", "ls", "--config", str(config)) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("cut/big")]
    assert len(rows) == 2 and all(UNITS.search(row) for row in rows), out
    assert re.search(r"^total: 2 images? in 1 repositor(y|ies), \d", out, re.M), out
    assert str(big.layers[0].size) not in out  # no raw byte counts

    assert await cli("cache", "purge", "--config", str(config), "nothere/x:1") == 1
    assert "nothing cached" in capsys.readouterr().err
    assert await cli("cache", "purge", "--config", str(config), "cut/big") == 0  # every tag
    out = capsys.readouterr().out
    assert "cut/big:v1" in out and "cut/big:v2" in out and UNITS.search(out)
    assert await cli("cache", "purge", "--config", str(config), "cut/big") == 1  # nothing left
    capsys.readouterr()
    assert await cli("cache", "purge", "--config", str(config), "team/x:1") == 2  # hosted


async def test_a_purge_reaches_every_running_worker(upstream_registry, http_session, tmp_path):
    """A tag is trusted for an hour here; after `cache purge` both workers stop answering
    from memory and ask the upstream again."""
    reg = upstream_registry
    old = await push_image(http_session, reg.url, "cut/purged", "v1", [make_tar_layer(seed=511)])
    data = tmp_path / "data"
    config = write_config(tmp_path / "c.toml", reg, data, 'tag_ttl = "1h"')

    async def digests(url: str, n: int) -> set[str]:
        seen = set()
        for _ in range(n):  # a fresh connection each time: SO_REUSEPORT spreads them
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                    s.get(url, headers={"Accept": old.media_type}) as r:
                assert r.status == 200, await r.text()
                seen.add(r.headers["Docker-Content-Digest"])
        return seen

    with ProxyProcess(tmp_path / "p", "--config", str(config), "--workers", "2") as proxy:
        url = f"{proxy.url}/v2/cut/purged/manifests/v1"
        assert await digests(url, 20) == {old.digest}
        new = await push_image(http_session, reg.url, "cut/purged", "v1", [make_tar_layer(seed=512)])
        assert await digests(url, 10) == {old.digest}  # trusted for the hour
        assert await cli("cache", "purge", "--config", str(config),
                                              "cut/purged:v1") == 0
        # each worker looks at the store's purge marker about once a second, on its own
        # clock: wait until a round of fresh connections (spread over both) all see it
        deadline = asyncio.get_running_loop().time() + 30
        while (seen := await digests(url, 20)) != {new.digest}:
            assert asyncio.get_running_loop().time() < deadline, f"a worker kept {seen}"
            await asyncio.sleep(0.2)


async def test_warm_reports_each_failure_once_and_what_was_cached(
        aiohttp_server, upstream_registry, http_session, tmp_path, capsys, monkeypatch):
    reg = upstream_registry
    img = await push_image(http_session, reg.url, "cut/warm", "v1", [layer(521, 200_000)])
    server = await aiohttp_server(create_app(make_config(tmp_path / "d", {"upstream.test": reg.url})))
    base = f"http://127.0.0.1:{server.port}"

    labels: list[str] = []

    class Recorder(Progress):
        def task(self, description: str, total: int | None) -> object:
            labels.append(description)
            return None

    monkeypatch.setattr(warm_module, "make_progress", lambda _enabled=None: Recorder())
    args = _build_parser().parse_args(["warm", "cut/warm:v1", "cut/missing:v1", "--proxy", base,
                                       "--no-progress"])
    assert await commands._run(args) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert [line for line in text.splitlines() if "cut/missing" in line] == [
        line for line in text.splitlines() if line.startswith("FAILED cut/missing:v1: ")], text
    assert len([line for line in text.splitlines() if "cut/missing" in line]) == 1, text
    assert labels and all(label.startswith("cut/warm:v1 ") for label in labels), labels
    summary = captured.out.strip().splitlines()[-1]
    assert "bytes" not in summary and UNITS.search(summary) and "MiB/s" in summary
    assert "0 B already cached" in summary, summary

    # a fill publishes just after its client's last byte: wait until both blobs are stored
    stored = [blob_path(tmp_path / "d", d.digest)
              for d in [img.config, *img.layers]]
    for _ in range(500):
        if all(p.exists() for p in stored):
            break
        await asyncio.sleep(0.01)
    assert all(p.exists() for p in stored)
    again = await warm(["cut/warm:v1"], base)
    total = sum(d.size for d in [img.config, *img.layers])
    assert again.cached_bytes == total and again.bytes == total
    assert f"{human_size(total)} already cached" in again.summary()


async def test_a_failed_manifest_push_names_the_digest_with_an_at(aiohttp_server):
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"errors": [{"code": "DENIED"}]}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = await aiohttp_server(app)
    digest = "sha256:" + "ab" * 32
    async with RegistryClient.connect(f"http://127.0.0.1:{server.port}") as client:
        with pytest.raises(ToolError) as err:
            await client.put_manifest("alpine", digest, b"{}", "application/json")
        assert f"alpine@{digest}" in str(err.value)
        with pytest.raises(ToolError) as err:
            await client.get_manifest("alpine", digest)
        assert f"alpine@{digest}" in str(err.value)


async def test_the_client_sends_no_credentials_to_a_realm_on_another_http_origin(aiohttp_server):
    """A registry (or whoever answers on its address) naming an http token realm on another
    port must not get the user's password sent there in cleartext: the realm must be https
    or the registry's own origin (the proxy's own rule for upstreams, docs/security.md)."""
    seen: list[tuple[int, str | None]] = []
    realm = {"url": ""}

    async def token(request: web.Request) -> web.Response:
        seen.append((request.url.port or 0, request.headers.get("Authorization")))
        return web.json_response({"token": "t"})

    async def challenge(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == "Bearer t":
            return web.json_response({"tags": []})
        return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={
            "WWW-Authenticate": f'Bearer realm="{realm["url"]}",service="reg"'})

    def app() -> web.Application:
        a = web.Application()
        a.router.add_get("/token", token)
        a.router.add_route("*", "/{tail:.*}", challenge)
        return a

    thief, registry = await aiohttp_server(app()), await aiohttp_server(app())
    realm["url"] = f"http://127.0.0.1:{thief.port}/token"
    async with RegistryClient.connect(f"http://127.0.0.1:{registry.port}", username="u",
                                      password="secret") as client:
        with pytest.raises(ToolError) as err:
            async with client.request("GET", "/v2/a/tags/list", repo="a"):
                pass
        assert "realm" in str(err.value)
        assert seen == []
        # the registry's own origin (a local registry's token service) still gets them
        realm["url"] = f"http://127.0.0.1:{registry.port}/token"
        async with client.request("GET", "/v2/a/tags/list", repo="a") as resp:
            assert resp.status == 200
    assert [port for port, _ in seen] == [registry.port]
    assert seen[0][1] is not None and seen[0][1].startswith("Basic ")
