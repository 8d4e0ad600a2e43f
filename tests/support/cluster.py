"""N replicas of the proxy as real processes on one S3 bucket and one Redis (tests, bench)."""

from __future__ import annotations

from pathlib import Path

from proxy.config import S3Config
from tests.support.proxyproc import ProxyProcess
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY

SECRET = "cluster-secret-for-tests-0123456789"


def _config(workdir: Path, url: str, upstream: str, s3: S3Config | None, redis_url: str | None,
            lease: str, extra: str) -> Path:
    """A replica's config.toml; without ``s3``/``redis_url`` a plain single node."""
    path = workdir / "config.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    text = f"""
[server]
access_log = false

[storage]
root = "{workdir / 'data'}"
"""
    if s3 is not None:
        text += f"""backend = "s3"

[storage.s3]
bucket = "{s3.bucket}"
endpoint = "{s3.endpoint_url}"
prefix = "{s3.prefix}"
access_key = "{ACCESS_KEY}"
secret_key = "{SECRET_KEY}"
redirect = {"true" if s3.redirect else "false"}
"""
    if redis_url is not None:
        text += f"""
[cache]
backend = "redis"
url = "{redis_url}"
tag_ttl = "60s"

[cluster]
advertise_url = "{url}"
secret = "{SECRET}"
lease = "{lease}"
"""
    path.write_text(text + f"""{extra}

[proxy]
default_upstream = "upstream.test"

[upstreams."upstream.test"]
url = "{upstream}"
""")
    return path


class Replicas:
    """N replicas of the proxy sharing one bucket prefix and one Redis."""

    def __init__(self, root: Path, upstream: str, s3: S3Config | None, redis_url: str | None,
                 n: int = 3, lease: str = "15s", extra: str = "") -> None:
        self.s3 = s3
        self.procs: list[ProxyProcess] = []
        for i in range(n):
            proc = ProxyProcess(root / f"replica{i}")
            cfg = _config(root / f"replica{i}", proc.url, upstream, s3, redis_url, lease, extra)
            proc.args += ["--config", str(cfg)]
            self.procs.append(proc)

    def start(self) -> Replicas:
        for proc in self.procs:
            proc.start(timeout=30)
        return self

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def by_url(self, url: str) -> ProxyProcess:
        return next(p for p in self.procs if p.url == url)


