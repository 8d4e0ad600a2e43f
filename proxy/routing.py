"""Which upstream serves a repository, and under which name its content is cached.

Three ways to address an upstream, all mapping to one cache key (the *local name*):

* containerd's ``?ns=<registry host>`` query (hosts.toml mirrors, dockerd's containerd store);
* a path prefix: ``/v2/ghcr.io/org/img/...`` (podman mirror locations, ``override_path``);
* nothing: the default upstream (``registry-mirrors`` traffic, which is always Docker Hub).

Hosted repositories (push allowed) match the ``[hosted]`` patterns and are addressed
without ``ns`` or upstream prefix; a hosted pattern may not start with an upstream's name,
so a name is either hosted or cached, never both.

The local name is ``<name>`` for the default upstream and ``<upstream>/<name>`` for the
others, so ``?ns=docker.io`` + ``alpine``, ``docker.io/library/alpine`` and
``library/alpine`` are the same cached repository, and ``ns`` never enters a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import NameInvalid, NameUnknown
from proxy.reference import validate_name
from proxy.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request for a repository goes: an upstream, or ``None`` when hosted here."""

    name: str  #: local name, as stored and listed by ``_catalog``
    remote: str  #: name on the upstream
    upstream: UpstreamClient | None

    @property
    def hosted(self) -> bool:
        return self.upstream is None

    @property
    def upstream_client(self) -> UpstreamClient:
        """The upstream of a proxied route (asking a hosted route is a bug)."""
        if self.upstream is None:
            raise AssertionError(f"{self.name} is hosted: it has no upstream")
        return self.upstream


def compile_patterns(patterns: tuple[str, ...] | list[str]) -> re.Pattern[str] | None:
    """``team/*`` (one component), ``team/**`` (any depth), exact names; ``None`` if empty."""
    if not patterns:
        return None
    parts = []
    for pattern in patterns:
        comps = []
        for comp in pattern.split("/"):
            if comp == "**":
                comps.append(r"[^/]+(?:/[^/]+)*")
            else:
                comps.append(re.escape(comp).replace(r"\*", "[^/]*"))
        parts.append("/".join(comps))
    return re.compile("|".join(f"(?:{p})" for p in parts))


class Router:
    """Maps (repository name, ``ns``) to a :class:`Route`."""

    def __init__(self, upstreams: dict[str, UpstreamClient], default: str | None,
                 hosted: tuple[str, ...] = ()) -> None:
        self._hosted = compile_patterns(hosted)
        self._memo: dict[tuple[str, str | None], Route] = {}
        self._default = upstreams.get(default) if default else None
        self._by_host: dict[str, UpstreamClient] = {}
        for up in upstreams.values():
            for host in (up.name, *up.config.aliases):
                self._by_host[host.lower()] = up

    def route(self, name: str, ns: str | None = None) -> Route:
        """Resolve a repository name (validated on the way); NAME_UNKNOWN when nothing
        serves it. Results are memoised: routing sits on every request's hot path."""
        key = (name, ns)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        route = self._route(name, ns)
        if len(self._memo) >= 10_000:
            self._memo.clear()
        self._memo[key] = route
        return route

    def _route(self, name: str, ns: str | None) -> Route:
        validate_name(name)
        if ns is not None:
            upstream = self._by_host.get(ns.strip().lower())
            if upstream is None:
                raise NameUnknown(f"no upstream is configured for ns={ns[:100]!r}")
            return self._make(upstream, name)
        if self._hosted is not None and self._hosted.fullmatch(name):
            return Route(name=name, remote=name, upstream=None)
        first, _, rest = name.partition("/")
        upstream = self._by_host.get(first)
        if upstream is not None and rest:
            return self._make(upstream, rest)
        if self._default is None:
            raise NameUnknown(f"repository {name!r} matches no upstream and no default is set")
        return self._make(self._default, name)

    @property
    def upstreams(self) -> list[UpstreamClient]:
        """Every configured upstream, once each."""
        return list({id(u): u for u in self._by_host.values()}.values())

    @property
    def default(self) -> UpstreamClient | None:
        return self._default

    def is_hosted(self, name: str) -> bool:
        return self._hosted is not None and self._hosted.fullmatch(name) is not None

    def _make(self, upstream: UpstreamClient, name: str) -> Route:
        remote = upstream.remote_name(name)
        local = remote if upstream is self._default else f"{upstream.name}/{remote}"
        try:
            validate_name(local)
        except NameInvalid:
            raise NameInvalid(f"repository name too long: {local[:300]!r}") from None
        return Route(name=local, remote=remote, upstream=upstream)
