"""Which upstream serves a repository, and under which names its content is kept.

Three ways to address an upstream, all mapping to one cached repository:

* containerd's ``?ns=<registry host>`` query (hosts.toml mirrors, dockerd's containerd store);
* a path prefix: ``/v2/ghcr.io/org/img/...`` (podman mirror locations, ``override_path``);
* nothing: the default upstream (``registry-mirrors`` traffic, which is always Docker Hub).

Hosted repositories (push allowed) match the ``[hosted]`` patterns and are addressed
without ``ns`` or upstream prefix.

Each repository has two names. Its *name* is what clients, access rules, ``_catalog`` and
logs see: ``<name>`` for the default upstream and for hosted repositories,
``<upstream>/<name>`` for the other upstreams, so ``?ns=docker.io`` + ``alpine``,
``docker.io/library/alpine`` and ``library/alpine`` are one repository. Its *key* is where
the store keeps it: a hosted repository's name, and ``<upstream>/<remote name>`` for every
cached one, the default upstream's included. An upstream named ``host:port`` appears in
names and keys as ``host_port`` (:func:`proxy.config.path_form`: ``:`` is outside the name
grammar, and no upstream name contains ``_``); as a path prefix both forms route to it.
Hosted names never begin with an upstream's name or its path form (such a name always
routes to that upstream), so the two kinds of keys cannot collide; and a request routed to
an upstream whose name is a hosted name is refused, so a pull with ``?ns=docker.io`` never
reads or writes a hosted repository.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.bounded import BoundedDict
from proxy.config import UpstreamConfig, path_form
from proxy.errors import NameInvalid, NameUnknown
from proxy.policy.rules import compile_repository_patterns
from proxy.reference import validate_name
from proxy.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request for a repository goes: an upstream, or ``None`` when hosted here."""

    name: str  #: what clients, access rules, ``_catalog`` and logs call it
    key: str  #: where the store keeps it (``<upstream>/<remote>`` when cached)
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
    """``team/*`` (one component), ``team/**`` (any depth), exact names; ``None`` if empty
    (the same grammar as the upstreams' rules: :func:`compile_repository_patterns`)."""
    return compile_repository_patterns(patterns) if patterns else None


@dataclass(frozen=True, slots=True)
class Place:
    """Where a name leads, worked out from the configuration alone (no clients needed:
    offline commands such as ``regproxy cache`` use it too)."""

    name: str
    key: str
    remote: str
    upstream: str | None  #: the upstream's configured name; ``None``: hosted


class Namespaces:
    """The naming rules of :mod:`proxy.routing` over configured upstreams and patterns."""

    def __init__(self, upstreams: Mapping[str, UpstreamConfig], default: str | None,
                 hosted: tuple[str, ...] | list[str] = ()) -> None:
        self._hosted = compile_patterns(tuple(hosted))
        self._upstreams = dict(upstreams)
        self.default = default if default in self._upstreams else None
        self._by_host: dict[str, UpstreamConfig] = {}
        for up in self._upstreams.values():
            for host in (up.name, *up.aliases):
                self._by_host[host.lower()] = self._by_host[path_form(host.lower())] = up
        #: the first component of each upstream's keys -> the upstream's name
        self._key_prefixes = {path_form(name): name for name in self._upstreams}

    def is_hosted(self, name: str) -> bool:
        """Whether ``name`` is a hosted repository (never one beginning with an upstream)."""
        if self._hosted is None or self._hosted.fullmatch(name) is None:
            return False
        first, sep, _ = name.partition("/")
        return not (sep and first in self._by_host)

    def place(self, name: str, ns: str | None = None) -> Place:
        """Resolve a repository name (validated on the way); NAME_UNKNOWN when nothing
        serves it, or when it is routed to an upstream but is a hosted repository's name."""
        first, sep, rest = name.partition("/")
        if ":" in first and sep and ns is None:  # /v2/<host:port>/<name>/...
            ported = self._by_host.get(first)
            if ported is not None:
                return self._cached(ported, validate_name(rest))
        validate_name(name)
        if ns is not None:
            upstream = self._by_host.get(ns.strip().lower())
            if upstream is None:
                raise NameUnknown(f"no upstream is configured for ns={ns[:100]!r}")
            if sep and rest and self._by_host.get(first) is upstream:
                name = rest  # ?ns= and a path prefix naming the same upstream (override_path)
            return self._cached(upstream, name)
        by_prefix = self._by_host.get(first)
        if by_prefix is not None and rest:
            return self._cached(by_prefix, rest)
        if self.is_hosted(name):
            return Place(name=name, key=name, remote=name, upstream=None)
        if self.default is None:
            raise NameUnknown(f"repository {name!r} matches no upstream and no default is set")
        return self._cached(self._upstreams[self.default], name)

    def _cached(self, upstream: UpstreamConfig, name: str) -> Place:
        remote = f"library/{name}" if upstream.library_prefix and "/" not in name else name
        prefix = path_form(upstream.name)
        local = remote if upstream.name == self.default else f"{prefix}/{remote}"
        try:
            validate_name(local)
        except NameInvalid:
            raise NameInvalid(f"repository name too long: {local[:300]!r}") from None
        if self.is_hosted(local):
            raise NameUnknown(f"{local} is a hosted repository here; it is not served as "
                              f"content of upstream {upstream.name}")
        return Place(name=local, key=f"{prefix}/{remote}", remote=remote,
                     upstream=upstream.name)

    def is_cached_key(self, key: str) -> bool:
        """Whether a stored repository key is a cached one (it begins with an upstream)."""
        first, sep, _ = key.partition("/")
        return bool(sep) and first in self._key_prefixes

    def is_hosted_key(self, key: str) -> bool:
        """Whether a stored repository key is hosted content (eviction never takes it)."""
        return not self.is_cached_key(key)

    def name_of_key(self, key: str) -> str | None:
        """The name clients address a stored repository by; ``None`` when no name leads
        there any more (its hosted pattern or its upstream left the configuration)."""
        if self.is_cached_key(key):
            first, _, remote = key.partition("/")
            name = remote if self._key_prefixes[first] == self.default else key
        else:
            name = key
        try:
            return name if self.place(name).key == key else None
        except (NameInvalid, NameUnknown):
            return None


class Router:
    """Maps (repository name, ``ns``) to a :class:`Route` with its upstream client."""

    def __init__(self, names: Namespaces, upstreams: Mapping[str, UpstreamClient]) -> None:
        self.names = names
        self._clients = dict(upstreams)
        self._memo: BoundedDict[tuple[str, str | None], Route] = BoundedDict(10_000)

    def route(self, name: str, ns: str | None = None) -> Route:
        """Resolve a repository name (see :meth:`Namespaces.place`). Results are memoised:
        routing sits on every request's hot path."""
        key = (name, ns)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        place = self.names.place(name, ns)
        upstream = None if place.upstream is None else self._clients[place.upstream]
        route = Route(name=place.name, key=place.key, remote=place.remote, upstream=upstream)
        self._memo[key] = route
        return route

    @property
    def upstreams(self) -> list[UpstreamClient]:
        """Every configured upstream, once each."""
        return list(self._clients.values())

    @property
    def default(self) -> UpstreamClient | None:
        return None if self.names.default is None else self._clients[self.names.default]
