"""Building a proxy instance for tests: a config pointing at given upstreams."""

from __future__ import annotations

from pathlib import Path

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
