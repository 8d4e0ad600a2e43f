"""``[cluster]`` of ``config.toml``: several replicas sharing fills (through Redis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.redact import redact_url
from proxy.settings.fields import ConfigError, parse_duration, parse_url, str_value, take_keys


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How replicas find each other for single flight across replicas (needs Redis)."""

    advertise_url: str  #: how the other replicas reach this one (its internal address)
    secret: str  #: shared by all replicas; authenticates their internal requests
    lease: float = 15.0  #: seconds a dead filler keeps its lease before another takes over

    def __repr__(self) -> str:  # never print the secret
        return f"ClusterConfig(advertise_url={redact_url(self.advertise_url)!r})"


def parse_cluster(raw: Any) -> ClusterConfig | None:
    """``[cluster]``, or ``None`` without one (a single replica)."""
    if raw is None:
        return None
    t = take_keys(raw, "cluster", {"advertise_url", "secret", "lease"})
    for key in ("advertise_url", "secret"):
        if key not in t:
            raise ConfigError(f"cluster.{key}", "required in [cluster]")
    secret = str_value("cluster.secret", t["secret"])
    if len(secret) < 16:
        raise ConfigError("cluster.secret", "use at least 16 random characters")
    lease = parse_duration("cluster.lease", t.get("lease", 15))
    if lease < 1:
        raise ConfigError("cluster.lease", "must be at least 1s")
    return ClusterConfig(advertise_url=parse_url("cluster.advertise_url", t["advertise_url"]).rstrip("/"),
                         secret=secret, lease=lease)
