"""`regproxy healthcheck` (the image's HEALTHCHECK): it probes where the configured server
listens, and its exit code says whether /healthz answered 200."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.app import create_app
from proxy.cli import main
from proxy.config import load
from proxy.healthcheck import probe_url
from tests.support.proxyfix import make_config
from tests.support.registry import free_port


def config(tmp_path: Path, text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load(path, env=env or {})


def test_probe_url_follows_listen_env_and_debug_listener(tmp_path: Path) -> None:
    assert probe_url(config(tmp_path, '[server]\nlisten = "0.0.0.0:5000"\n')) == "http://127.0.0.1:5000/healthz"
    assert probe_url(config(tmp_path, '[server]\nlisten = "[::]:5000"\n')) == "http://[::1]:5000/healthz"
    env = {"REGISTRY_HTTP_ADDR": "0.0.0.0:6000"}
    assert probe_url(config(tmp_path, "", env)) == "http://127.0.0.1:6000/healthz"
    debug = '[server]\nlisten = "0.0.0.0:5000"\ndebug_listen = "127.0.0.1:5001"\n'
    assert probe_url(config(tmp_path, debug)) == "http://127.0.0.1:5001/healthz"


async def test_exit_code_says_whether_healthz_answers(aiohttp_server, tmp_path: Path) -> None:
    server = await aiohttp_server(create_app(make_config(tmp_path / "data", {})))
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = "0.0.0.0:{server.port}"\n')
    # run in a thread: the probe is blocking and the server lives in this loop
    assert await asyncio.to_thread(main, ["healthcheck", "--config", str(path)]) == 0
    closed = f"http://127.0.0.1:{free_port()}/healthz"
    assert await asyncio.to_thread(main, ["healthcheck", "--url", closed, "--timeout", "2"]) == 1
    missing = f"http://127.0.0.1:{server.port}/nothing-here"
    assert await asyncio.to_thread(main, ["healthcheck", "--url", missing]) == 1
