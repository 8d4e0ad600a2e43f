"""Configuration: ``config.toml`` and the environment composed into one :class:`Config`.

The sections are parsed by :mod:`proxy.settings` (one module each, sharing the field parsers
of :mod:`proxy.settings.fields`); this module parses the flat ``[server]``, ``[storage]``,
``[cache]``, ``[proxy]`` and ``[hosted]`` keys, checks what spans sections (hosted patterns
against upstream prefixes, the debug port) and applies the environment
(:mod:`proxy.envconfig`, on the raw tables) and the command line. It is the settings'
public face: the rest of the code imports its settings from here.

Every problem is reported as ``<key>: <problem>`` so an operator can fix the file without
reading code; unknown keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.defaults import DEFAULTS, with_defaults
from proxy.envconfig import (
    PROXY_URL,
    PROXY_USER,
    ProxyRemote,
    apply_env,
    key_name,
    proxy_remote,
    resolve_files,
    unused_distribution_vars,
)
from proxy.logsetup import FORMATS, LEVELS
from proxy.redact import redact_url
from proxy.settings.auth import AuthConfig, parse_auth
from proxy.settings.cluster import ClusterConfig, parse_cluster
from proxy.settings.fields import (
    ConfigError,
    bool_value,
    choice_value,
    count_value,
    parse_duration,
    parse_listen,
    parse_min_free,
    parse_networks,
    parse_size,
    parse_url,
    parse_workers,
    str_value,
    take_keys,
)
from proxy.settings.prefetch import PrefetchConfig, parse_prefetch
from proxy.settings.storage import S3Config, parse_s3
from proxy.settings.tls import TLSConfig, parse_tls
from proxy.settings.upstreams import (
    DOCKER_HUB,
    DOCKER_HUB_ALIASES,
    UpstreamConfig,
    UpstreamURL,
    check_upstream_name,
    parse_upstreams,
    path_form,
)

__all__ = [
    "DOCKER_HUB", "DOCKER_HUB_ALIASES", "AuthConfig", "ClusterConfig", "Config", "ConfigError",
    "PrefetchConfig", "S3Config", "TLSConfig", "UpstreamConfig", "UpstreamURL", "check_hosted",
    "from_dict", "load",
    "parse_duration", "parse_size", "path_form", "repoint_default",
]

log = logging.getLogger("regproxy.config")


@dataclass(frozen=True)
class Config:
    """The whole configuration of one proxy instance."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 5000
    access_log: bool = True
    workers: int = 1
    #: ``server.shutdown_grace``: seconds in-flight requests get after SIGTERM/SIGINT before
    #: their connections are cut (one deadline, for one process and for workers alike).
    shutdown_grace: float = 30.0
    log_level: str = "INFO"  #: ``server.log_level`` (``--log-level`` overrides it)
    log_format: str = "text"  #: ``server.log_format``: ``"text"`` or ``"json"`` (one object a line)
    #: ``server.trusted_proxies``: peers whose ``Forwarded``/``X-Forwarded-For`` is believed.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: ``server.debug_listen``: (host, port) of a plain-HTTP listener, without auth, for the
    #: status pages, metrics and probes; the main listener then no longer serves the pages.
    debug_listen: tuple[str, int] | None = None
    storage_root: Path = Path("./data")
    s3: S3Config | None = None  #: [storage] backend = "s3"; storage_root then holds temp files
    cluster: ClusterConfig | None = None  #: [cluster]: several replicas
    tag_ttl: float = 300.0
    #: A tag expired less than this ago is answered at once while it is revalidated in
    #: the background (HTTP's stale-while-revalidate); 0: requests wait for the HEAD.
    tag_stale_while_revalidate: float = 30.0
    manifest_memory: int = 64 << 20
    max_size: int = 0
    max_age: float = 0.0
    cache_backend: str = "memory"
    cache_url: str | None = None
    max_manifest_size: int = 4 << 20
    #: ``cache.prefetch*``: fill an image's blobs when its manifest is fetched.
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    default_upstream: str | None = DOCKER_HUB
    default_platform: tuple[str, str] = ("linux", "amd64")
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    hosted: tuple[str, ...] = ()
    delete_enabled: bool = True
    upload_max_age: float = 86400.0
    #: Open upload sessions per hosted repository, and per user (or client address when
    #: nobody is signed in); 0: no cap.
    max_uploads_per_repository: int = 64
    max_uploads_per_user: int = 256
    #: ``storage.min_free``: free space (bytes, or % of the disk) below which uploads and new
    #: fills are refused.
    min_free: int = 1 << 30
    min_free_percent: float = 0.0
    tls: TLSConfig | None = None  #: [tls]: serve HTTPS (proxy/tls.py)
    auth: AuthConfig | None = None  #: [auth]: users and access rules (proxy/auth/)
    #: Where each key's value came from (``cache.tag_ttl`` -> ``file``, ``environment
    #: (VAR)``, ``flag (--x)``, ``default``), for the console; empty for a Config built in
    #: code (:func:`load` and :meth:`with_overrides` fill it).
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def with_overrides(
        self,
        *,
        listen: str | None = None,
        upstream: str | None = None,
        data_dir: str | None = None,
        hosted: list[str] | None = None,
        workers: str | int | None = None,
    ) -> Config:
        """Apply the command-line flags that take precedence over the file."""
        cfg = self
        given = {"server.listen": ("--listen", listen), "server.workers": ("--workers", workers),
                 "hosted.repositories": ("--hosted", hosted), "storage.root": ("--data-dir", data_dir)}
        sources = {**self.sources, **{key: f"flag ({flag})" for key, (flag, value) in given.items()
                                      if value}}
        if listen is not None:
            host, port = parse_listen("--listen", listen)
            cfg = replace(cfg, listen_host=host, listen_port=port)
        if workers is not None:
            cfg = replace(cfg, workers=parse_workers("--workers", workers))
        if hosted:
            patterns = tuple(parse_hosted_pattern("--hosted", p) for p in hosted)
            cfg = replace(cfg, hosted=(*cfg.hosted, *patterns))
        if data_dir is not None:
            cfg = replace(cfg, storage_root=Path(data_dir))
        if cfg.workers > 1 and cfg.listen_port == 0:
            raise ConfigError("server.workers", "several workers need a fixed listen port")
        check_debug_listen(cfg)
        if upstream is not None:
            cfg = repoint_default(cfg, parse_url("--upstream", upstream))
            sources["proxy.default_upstream"] = "flag (--upstream)"
            sources[key_name(("upstreams", cfg.default_upstream or "", "url"))] = "flag (--upstream)"
        check_hosted(cfg)
        return replace(cfg, sources=sources)


def repoint_default(cfg: Config, url: str) -> Config:
    """``--upstream URL``: URL becomes the default upstream, reached by every name of the
    previous default too (unprefixed, and its name and aliases as ``ns`` or path prefix), so
    no way of naming the default still leads to the old registry. The old default leaves
    the configuration with its credentials (they are not the new registry's); an upstream
    already named by URL's host keeps its settings and gets the new URL."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    name = host if parts.port is None else f"{host}:{parts.port}"
    ups = dict(cfg.upstreams)
    owner = next((u for u in ups.values() if name == u.name or name in u.aliases), None)
    if owner is None:
        check_upstream_name("--upstream", name)
        owner = UpstreamConfig(name=name, url=url, library_prefix=host == "registry-1.docker.io")
    old = ups.get(cfg.default_upstream) if cfg.default_upstream is not None else None
    aliases = owner.aliases
    if old is not None and old.name != owner.name:
        del ups[old.name]
        aliases = tuple(dict.fromkeys((*aliases, old.name, *old.aliases)))
    ups[owner.name] = replace(owner, url=url, aliases=aliases)
    return replace(cfg, upstreams=ups, default_upstream=owner.name)


def check_debug_listen(cfg: Config) -> None:
    """The debug listener needs its own port, and a fixed one when workers share it."""
    if cfg.debug_listen is None:
        return
    host, port = cfg.debug_listen
    wildcard = {"0.0.0.0", "::", ""}
    if port != 0 and port == cfg.listen_port and (
            host == cfg.listen_host or host in wildcard or cfg.listen_host in wildcard):
        raise ConfigError("server.debug_listen", f"port {port} is the main listener's (server.listen)")
    if port == 0 and cfg.workers > 1:
        raise ConfigError("server.debug_listen", "several workers need a fixed debug port")


_PATTERN_RE = re.compile(r"[a-z0-9._/*-]+")


def parse_hosted_pattern(key: str, value: Any) -> str:
    """A hosted-namespace pattern: a repository name where ``*`` matches one path component
    and a trailing ``/**`` any depth (``team/*``, ``internal/**``, ``exact/name``)."""
    if not isinstance(value, str) or not _PATTERN_RE.fullmatch(value) or value.startswith("/"):
        raise ConfigError(key, f"expected a repository pattern such as \"team/*\", got {value!r}")
    return value


def check_hosted(cfg: Config) -> None:
    """A name is either hosted or cached, never both: hosted patterns may not start with an
    upstream's name, nor with its name's path form (both route by path prefix)."""
    prefixes = {f(a) for u in cfg.upstreams.values() for a in (u.name, *u.aliases)
                for f in (str, path_form)}
    for pattern in cfg.hosted:
        first = pattern.split("/", 1)[0]
        if first in prefixes or (first in ("*", "**") and prefixes):
            raise ConfigError("hosted.repositories",
                              f"pattern {pattern!r} overlaps the upstream path prefix {first!r} "
                              "(an unused upstream goes with \"<name>\" = false under [upstreams])")


def from_dict(data: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Build a :class:`Config` from parsed TOML merged over :data:`proxy.defaults.DEFAULTS`
    (the one source of defaults); relative paths resolve against ``base_dir``."""
    top = take_keys(with_defaults(data), "config", {
        "server", "storage", "cache", "proxy", "upstreams", "hosted", "tls", "auth", "cluster"})
    hosted = take_keys(top.get("hosted", {}), "hosted",
                   {"repositories", "delete_enabled", "upload_max_age",
                    "max_uploads_per_repository", "max_uploads_per_user"})
    patterns = hosted["repositories"]
    if not isinstance(patterns, list):
        raise ConfigError("hosted.repositories", "expected a list of patterns such as [\"team/*\"]")
    server = take_keys(top.get("server", {}), "server", {"listen", "access_log", "workers", "debug_listen",
                                                   "shutdown_grace", "log_level", "log_format",
                                                   "trusted_proxies"})
    storage = take_keys(top.get("storage", {}), "storage", {"root", "backend", "s3", "min_free"})
    min_free, min_free_percent = parse_min_free("storage.min_free",
                                                storage["min_free"])
    cache = take_keys(top.get("cache", {}), "cache", {"tag_ttl", "tag_stale_while_revalidate",
                                                  "manifest_memory", "max_manifest_size",
                                                  "max_size", "max_age", "backend", "url",
                                                  "prefetch", "prefetch_concurrency",
                                                  "prefetch_max_bytes"})
    backend = cache["backend"]
    if backend not in ("memory", "redis"):
        raise ConfigError("cache.backend", f"expected \"memory\" or \"redis\", got {backend!r}")
    cache_url = cache.get("url")
    if cache_url is not None and (not isinstance(cache_url, str)
                                  or urlsplit(cache_url).scheme not in ("redis", "rediss")):
        shown = redact_url(cache_url) if isinstance(cache_url, str) else cache_url
        raise ConfigError("cache.url", f"expected redis://[:password@]host:port/db, got {shown!r}")
    if backend == "redis" and cache_url is None:
        raise ConfigError("cache.url", "required with backend = \"redis\"")
    proxy = take_keys(top.get("proxy", {}), "proxy", {"default_upstream", "default_platform"})

    host, port = parse_listen("server.listen", server["listen"])
    root = Path(str_value("storage.root", storage["root"]))
    if not root.is_absolute():
        root = base_dir / root

    upstreams = parse_upstreams(top.get("upstreams", {}), base_dir)

    default = proxy.get("default_upstream")
    if default is not None:
        default = str_value("proxy.default_upstream", default)
        if default not in upstreams:
            raise ConfigError("proxy.default_upstream",
                              f"{default!r} is not one of the [upstreams] ({', '.join(upstreams) or 'none'})")
    platform = str_value("proxy.default_platform", proxy["default_platform"])
    if not re.fullmatch(r"[a-z0-9]+/[a-z0-9]+", platform):
        raise ConfigError("proxy.default_platform", f"expected OS/ARCH such as linux/amd64, got {platform!r}")
    os_name, arch = platform.split("/")

    s3 = parse_s3(storage)
    cluster = parse_cluster(top.get("cluster"))
    if cluster is not None and backend != "redis":
        raise ConfigError("cluster", "replicas coordinate through Redis: set cache.backend = \"redis\"")
    cfg = Config(
        listen_host=host,
        listen_port=port,
        access_log=bool_value("server.access_log", server["access_log"]),
        workers=parse_workers("server.workers", server["workers"]),
        shutdown_grace=parse_duration("server.shutdown_grace", server["shutdown_grace"]),
        log_level=choice_value("server.log_level", str(server["log_level"]).upper(), LEVELS),
        log_format=choice_value("server.log_format", server["log_format"], FORMATS),
        trusted_proxies=parse_networks("server.trusted_proxies", server["trusted_proxies"]),
        debug_listen=(parse_listen("server.debug_listen", server["debug_listen"])
                      if "debug_listen" in server else None),
        storage_root=root,
        s3=s3,
        cluster=cluster,
        tag_ttl=parse_duration("cache.tag_ttl", cache["tag_ttl"]),
        tag_stale_while_revalidate=parse_duration(
            "cache.tag_stale_while_revalidate", cache["tag_stale_while_revalidate"]),
        manifest_memory=parse_size("cache.manifest_memory", cache["manifest_memory"]),
        max_size=parse_size("cache.max_size", cache["max_size"]),
        max_age=parse_duration("cache.max_age", cache["max_age"]),
        cache_backend=backend,
        cache_url=cache_url,
        max_manifest_size=parse_size("cache.max_manifest_size", cache["max_manifest_size"]),
        prefetch=parse_prefetch(cache),
        default_upstream=default,
        default_platform=(os_name, arch),
        upstreams=upstreams,
        hosted=tuple(parse_hosted_pattern("hosted.repositories", p) for p in patterns),
        delete_enabled=bool_value("hosted.delete_enabled", hosted["delete_enabled"]),
        upload_max_age=parse_duration("hosted.upload_max_age", hosted["upload_max_age"]),
        max_uploads_per_repository=count_value("hosted.max_uploads_per_repository",
                                               hosted["max_uploads_per_repository"]),
        max_uploads_per_user=count_value("hosted.max_uploads_per_user",
                                         hosted["max_uploads_per_user"]),
        min_free=min_free,
        min_free_percent=min_free_percent,
    )
    check_hosted(cfg)
    check_debug_listen(cfg)
    return replace(cfg, tls=parse_tls(top["tls"], base_dir) if "tls" in top else None,
                   auth=parse_auth(top["auth"], base_dir) if "auth" in top else None)


def with_remote(cfg: Config, remote: ProxyRemote) -> Config:
    """distribution's ``REGISTRY_PROXY_*``: the URL re-points the default upstream as
    ``--upstream`` does; the credentials are the default upstream's."""
    if remote.url is not None:
        cfg = repoint_default(cfg, remote.url)
    if remote.username is not None and remote.password is not None:
        if cfg.default_upstream is None:
            raise ConfigError(PROXY_USER, f"no default upstream to use it for; set {PROXY_URL}")
        up = cfg.upstreams[cfg.default_upstream]
        cfg = replace(cfg, upstreams={**cfg.upstreams, up.name: replace(
            up, username=remote.username, password=remote.password)})
    check_hosted(cfg)
    return cfg


def load(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or the embedded defaults when ``None``), then apply the environment's
    ``REGISTRY_*``/``REGPROXY_*`` overrides (:mod:`proxy.envconfig`; ``env`` defaults to
    ``os.environ``); warns about the variables of a ``registry:2`` deployment that are not
    used."""
    data: dict[str, Any] = {}
    base_dir = Path(".")
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(str(path), "file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
        base_dir = path.resolve().parent
    env = resolve_files(os.environ if env is None else env)
    for warning in unused_distribution_vars(env):
        log.warning("%s", warning)
    sources = {key: "default" for key in _keys(DEFAULTS)}
    sources.update((key, "file") for key in _keys(data))
    remote = proxy_remote(env)
    cfg = with_remote(from_dict(apply_env(data, env, sources), base_dir=base_dir), remote)
    default = ("upstreams", cfg.default_upstream or "")
    for var, value, keys in ((PROXY_URL, remote.url, [("proxy", "default_upstream"), (*default, "url")]),
                             (PROXY_USER, remote.username, [(*default, "username"),
                                                            (*default, "password")])):
        if value is not None:
            sources.update((key_name(k), f"environment ({var})") for k in keys)
    return replace(cfg, sources=sources)


def _keys(table: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[str]:
    """Every key of a parsed TOML table, as :func:`~proxy.envconfig.key_name` writes it
    (a table's keys, not the table; an array is one key)."""
    out = []
    for name, value in table.items():
        if isinstance(value, Mapping) and value:
            out += _keys(value, (*path, name))
        else:
            out.append(key_name((*path, name)))
    return out
