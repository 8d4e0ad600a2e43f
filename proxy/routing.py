"""Which upstream serves a repository, and under which name its content is cached.

Three ways to address an upstream, all mapping to one cache key (the *local name*):

* containerd's ``?ns=<registry host>`` query (hosts.toml mirrors, dockerd's containerd store);
* a path prefix: ``/v2/ghcr.io/org/img/...`` (podman mirror locations, ``override_path``);
* nothing: the default upstream (``registry-mirrors`` traffic, which is always Docker Hub).

The local name is ``<name>`` for the default upstream and ``<upstream>/<name>`` for the
others, so ``?ns=docker.io`` + ``alpine``, ``docker.io/library/alpine`` and
``library/alpine`` are the same cached repository, and ``ns`` never enters a key.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import NameInvalid, NameUnknown
from proxy.reference import validate_name
from proxy.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request for a repository goes."""

    name: str  #: local (cache) name, as listed by ``_catalog``
    remote: str  #: name on the upstream
    upstream: UpstreamClient


class Router:
    """Maps (repository name, ``ns``) to a :class:`Route`."""

    def __init__(self, upstreams: dict[str, UpstreamClient], default: str | None) -> None:
        self._default = upstreams.get(default) if default else None
        self._by_host: dict[str, UpstreamClient] = {}
        for up in upstreams.values():
            for host in (up.name, *up.config.aliases):
                self._by_host[host.lower()] = up

    def route(self, name: str, ns: str | None = None) -> Route:
        """Resolve a validated-on-the-way repository name; NAME_UNKNOWN when nothing serves it."""
        validate_name(name)
        if ns is not None:
            upstream = self._by_host.get(ns.strip().lower())
            if upstream is None:
                raise NameUnknown(f"no upstream is configured for ns={ns[:100]!r}")
            return self._make(upstream, name)
        first, _, rest = name.partition("/")
        upstream = self._by_host.get(first)
        if upstream is not None and rest:
            return self._make(upstream, rest)
        if self._default is None:
            raise NameUnknown(f"repository {name!r} matches no upstream and no default is set")
        return self._make(self._default, name)

    def _make(self, upstream: UpstreamClient, name: str) -> Route:
        remote = upstream.remote_name(name)
        local = remote if upstream is self._default else f"{upstream.name}/{remote}"
        try:
            validate_name(local)
        except NameInvalid:
            raise NameInvalid(f"repository name too long: {local[:300]!r}") from None
        return Route(name=local, remote=remote, upstream=upstream)
