"""``[upstreams."<host>"]`` of ``config.toml``: the registries the proxy caches."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.policy.limits import Caps, parse_limits
from proxy.policy.rules import RuleSet, parse_rules
from proxy.policy.signatures import SignaturePolicy, parse_signature_policy
from proxy.redact import redact_url
from proxy.reference import NAME_RE
from proxy.settings.fields import (
    ConfigError,
    bool_value,
    parse_duration,
    parse_size,
    parse_url,
    positive_int,
    str_value,
    take_keys,
)

DOCKER_HUB = "docker.io"
#: Names under which clients refer to Docker Hub (containerd's ``ns`` uses ``docker.io``).
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


@dataclass(frozen=True)
class UpstreamURL:
    """One URL of an upstream, with the credentials that go to its origin only."""

    url: str
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never print the password
        return f"UpstreamURL(url={redact_url(self.url)!r})"


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream registry that the proxy caches."""

    name: str
    url: str
    aliases: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = None
    library_prefix: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    #: time to the response headers of manifest, tag and HEAD requests (a hung upstream)
    header_timeout: float = 5.0
    breaker_threshold: int = 3
    breaker_cooldown: float = 30.0
    #: forward proxy for its requests: ``None`` = HTTPS_PROXY/NO_PROXY..., ``""`` = direct
    proxy: str | None = None
    #: allow/deny rules on what may be fetched (``rules``, ``rules_default``); ``None``:
    #: neither is set, everything is allowed
    rules: RuleSet | None = None
    #: ``require_signature``: cosign key signatures needed to pull (``None``: not needed)
    require_signature: SignaturePolicy | None = None
    #: ranged GETs a big blob is fetched with at once (1: one stream, off)
    parallel_fills: int = 4
    #: blobs at least this big are fetched in ranges (when the upstream supports them)
    parallel_fill_threshold: int = 32 << 20
    #: ``[upstreams.<name>.limits]``: concurrency, rate and fill-bandwidth caps
    limits: Caps = field(default_factory=Caps)
    #: more URLs tried in order after ``url`` (``urls = [...]``), each with its own
    #: credentials and breaker; ``url``/``username``/``password`` are the first's
    more_urls: tuple[UpstreamURL, ...] = ()
    #: a range far ahead of a running fill may complete before the blob is verified (for
    #: lazy-pulling snapshotters that check their own chunks)
    unverified_ranges: bool = False

    @property
    def urls(self) -> tuple[UpstreamURL, ...]:
        """Every URL in the order they are tried."""
        return (UpstreamURL(self.url, self.username, self.password), *self.more_urls)

    def __repr__(self) -> str:  # never print the password
        return f"UpstreamConfig(name={self.name!r}, url={redact_url(self.url)!r})"


#: The keys of an ``[upstreams."<host>"]`` table.
UPSTREAM_KEYS = ("url", "aliases", "username", "password", "library_prefix", "connect_timeout",
                 "read_timeout", "header_timeout", "breaker_threshold", "breaker_cooldown",
                 "proxy", "rules", "rules_default", "require_signature", "parallel_fills",
                 "parallel_fill_threshold", "limits", "urls", "unverified_ranges")


def check_upstream_name(key: str, name: str) -> None:
    """An upstream's name is a host name, optionally with a port: a path prefix and an
    ``ns`` value."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*(:\d+)?", name) or NAME_RE.fullmatch(
            name.partition(":")[0]) is None:
        raise ConfigError(key, f"an upstream name must be a lower-case host name such as ghcr.io, "
                               f"got {name[:100]!r}")


def path_form(host: str) -> str:
    """An upstream name (or alias) as a repository name's first component: ``host:port``
    becomes ``host_port`` (``:`` is outside the name grammar). Upstream names never contain
    ``_``, so the form can equal no other upstream's name, and hosted patterns may not begin
    with it (:func:`proxy.config.check_hosted`)."""
    return host.replace(":", "_")


def parse_upstream(name: str, raw: Any, base_dir: Path = Path(".")) -> UpstreamConfig:
    """One ``[upstreams."<name>"]`` table (key files relative to ``base_dir``)."""
    key = f"upstreams.{name}"
    t = take_keys(raw, key, set(UPSTREAM_KEYS))
    check_upstream_name(key, name)
    if "url" in t and "urls" in t:
        raise ConfigError(f"{key}.urls", "give either url or urls, not both")
    if "url" not in t and "urls" not in t:
        raise ConfigError(f"{key}.url", "missing (e.g. url = \"https://ghcr.io\")")
    aliases = t.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{key}.aliases", "expected a list of host names")
    if "urls" in t:
        if "username" in t or "password" in t:
            raise ConfigError(f"{key}.username", "with urls, give credentials per URL "
                                                 "(urls = [{url = ..., username = ..., password = ...}])")
        urls = _parse_urls(f"{key}.urls", t["urls"])
    else:
        urls = (_parse_url_entry(key, {"url": t["url"], **{k: t[k] for k in ("username", "password")
                                                           if k in t}}),)
    first = urls[0]
    return UpstreamConfig(
        name=name,
        url=first.url,
        aliases=tuple(a.lower() for a in aliases),
        username=first.username,
        password=first.password,
        more_urls=urls[1:],
        limits=parse_limits(f"{key}.limits", t.get("limits")),
        library_prefix=bool_value(f"{key}.library_prefix", t.get("library_prefix", name == DOCKER_HUB)),
        connect_timeout=parse_duration(f"{key}.connect_timeout", t.get("connect_timeout", 5)),
        read_timeout=parse_duration(f"{key}.read_timeout", t.get("read_timeout", 30)),
        header_timeout=parse_duration(f"{key}.header_timeout", t.get("header_timeout", 5)),
        breaker_threshold=positive_int(f"{key}.breaker_threshold", t.get("breaker_threshold", 3)),
        breaker_cooldown=parse_duration(f"{key}.breaker_cooldown", t.get("breaker_cooldown", 30)),
        proxy=(None if "proxy" not in t else "" if t["proxy"] == ""
               else parse_url(f"{key}.proxy", t["proxy"])),
        rules=(parse_rules(key, t.get("rules"), t.get("rules_default"))
               if "rules" in t or "rules_default" in t else None),
        require_signature=(parse_signature_policy(f"{key}.require_signature",
                                                  t["require_signature"], base_dir)
                           if "require_signature" in t else None),
        parallel_fills=_parallel_fills(f"{key}.parallel_fills", t.get("parallel_fills", 4)),
        parallel_fill_threshold=parse_size(f"{key}.parallel_fill_threshold",
                                           t.get("parallel_fill_threshold", 32 << 20)),
        unverified_ranges=bool_value(f"{key}.unverified_ranges",
                                     t.get("unverified_ranges", False)),
    )


def _parallel_fills(key: str, value: Any) -> int:
    """How many ranged GETs fetch one big blob: 1 (off) to 16 (more only costs connections)."""
    count = positive_int(key, value)
    if count > 16:
        raise ConfigError(key, f"at most 16 ranged requests per blob, got {count}")
    return count


def _parse_urls(key: str, raw: Any) -> tuple[UpstreamURL, ...]:
    """``urls = ["https://mirror", {url = "https://origin", username = ..., password = ...}]``."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(key, "expected a non-empty list of URLs or {url, username, password} tables")
    urls = tuple(_parse_url_entry(f"{key}[{i}]", {"url": e} if isinstance(e, str) else e)
                 for i, e in enumerate(raw))
    if len({u.url for u in urls}) != len(urls):
        raise ConfigError(key, "a URL is listed twice")
    return urls


def _parse_url_entry(key: str, raw: Any) -> UpstreamURL:
    """One URL and its credentials (the upstream table's own keys, or one ``urls`` entry)."""
    t = take_keys(raw, key, {"url", "username", "password"})
    if "url" not in t:
        raise ConfigError(f"{key}.url", "missing")
    username, password = t.get("username"), t.get("password")
    if (username is None) != (password is None):
        raise ConfigError(f"{key}.password" if password is None else f"{key}.username",
                          "username and password must be given together")
    return UpstreamURL(
        url=parse_url(f"{key}.url", t["url"]),
        username=str_value(f"{key}.username", username) if username is not None else None,
        password=str_value(f"{key}.password", password) if password is not None else None,
    )


def parse_upstreams(raw: Any, base_dir: Path = Path(".")) -> dict[str, UpstreamConfig]:
    """``[upstreams]``: name -> upstream; no name or alias may stand for two upstreams."""
    tables = take_keys(raw, "upstreams", set(raw) if isinstance(raw, dict) else set())
    upstreams = {name: parse_upstream(name, t, base_dir) for name, t in tables.items()}
    seen: dict[str, str] = {}
    for up in upstreams.values():
        for alias in (up.name, *up.aliases):
            if alias in seen and seen[alias] != up.name:
                raise ConfigError(f"upstreams.{up.name}.aliases",
                                  f"{alias!r} is already used by upstream {seen[alias]!r}")
            seen[alias] = up.name
    return upstreams
