"""Building a proxy instance for tests: a config pointing at given upstreams, and the
base URL of an app served in-process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.config import Config, UpstreamConfig


def make_config(
    data_dir: Path,
    upstreams: dict[str, str],
    default: str | None = None,
    **overrides: object,
) -> Config:
    """A config with ``upstreams`` ({name: url}); the first is the default unless given.

    Timeouts are short so that fault tests finish quickly.
    """
    ups = {
        name: UpstreamConfig(name=name, url=url, connect_timeout=2.0, read_timeout=5.0,
                             breaker_threshold=3, breaker_cooldown=30.0,
                             proxy="",  # direct: an HTTPS_PROXY of the test machine stays out
                             library_prefix=name == "docker.io",
                             aliases=("index.docker.io", "registry-1.docker.io")
                             if name == "docker.io" else ())
        for name, url in upstreams.items()
    }
    base = Config(
        listen_host="127.0.0.1",
        listen_port=0,
        storage_root=data_dir,
        default_upstream=default or next(iter(upstreams), None),
        upstreams=ups,
    )
    return Config(**{**base.__dict__, **overrides})


def with_upstream_fields(cfg: Config, **fields: object) -> Config:
    """``cfg`` with ``fields`` (e.g. ``parallel_fills``) set on every upstream."""
    ups = {name: replace(up, **fields)  # type: ignore[arg-type]
           for name, up in cfg.upstreams.items()}
    return replace(cfg, upstreams=ups)


async def serve_app(aiohttp_server: Callable[[web.Application], Awaitable[Any]],
                    app: web.Application) -> str:
    """Serve ``app`` with pytest-aiohttp's ``aiohttp_server``: its base URL, no trailing
    slash (how upstream URLs and request paths are joined in the tests)."""
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")
