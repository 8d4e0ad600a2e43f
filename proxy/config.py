"""Configuration: ``config.toml`` parsed into typed, validated settings.

Every problem is reported as ``<key>: <problem>`` so an operator can fix the file without
reading code; unknown keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.defaults import with_defaults
from proxy.logsetup import FORMATS, LEVELS
from proxy.redact import redact_url
from proxy.reference import NAME_RE
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
    positive_int,
    str_value,
    take_keys,
)

if TYPE_CHECKING:
    from proxy.auth.settings import AuthConfig
    from proxy.tls import TLSConfig


DOCKER_HUB = "docker.io"
#: Names under which clients refer to Docker Hub (containerd's ``ns`` uses ``docker.io``).
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


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

    def __repr__(self) -> str:  # never print the password
        return f"UpstreamConfig(name={self.name!r}, url={redact_url(self.url)!r})"


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where the blobs live. ``access_key``/``secret_key`` left ``None`` fall back to
    botocore's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, IAM
    roles). ``endpoint_url`` ``None`` means AWS itself; custom endpoints (MinIO, SeaweedFS)
    get path-style addressing unless ``addressing_style`` says otherwise."""

    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    prefix: str = ""
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    addressing_style: str | None = None  # "path" | "virtual" | "auto"
    part_size: int = 8 << 20
    #: answer blob GETs with a 307 to a presigned URL instead of streaming the bytes
    redirect: bool = False

    def key(self, rest: str) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/{rest}" if prefix else rest



@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How replicas find each other for single flight across replicas (needs Redis)."""

    advertise_url: str  #: how the other replicas reach this one (its internal address)
    secret: str  #: shared by all replicas; authenticates their internal requests
    lease: float = 15.0  #: seconds a dead filler keeps its lease before another takes over

    def __repr__(self) -> str:  # never print the secret
        return f"ClusterConfig(advertise_url={redact_url(self.advertise_url)!r})"


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
        check_hosted(cfg)
        return cfg


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


def check_upstream_name(key: str, name: str) -> None:
    """An upstream's name is a host name, optionally with a port: a path prefix and an
    ``ns`` value."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*(:\d+)?", name) or NAME_RE.fullmatch(
            name.partition(":")[0]) is None:
        raise ConfigError(key, f"an upstream name must be a lower-case host name such as ghcr.io, "
                               f"got {name[:100]!r}")


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


def path_form(host: str) -> str:
    """An upstream name (or alias) as a repository name's first component: ``host:port``
    becomes ``host_port`` (``:`` is outside the name grammar). Upstream names never contain
    ``_``, so the form can equal no other upstream's name, and hosted patterns may not begin
    with it (:func:`check_hosted`)."""
    return host.replace(":", "_")


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


#: The keys of an ``[upstreams."<host>"]`` table.
UPSTREAM_KEYS = ("url", "aliases", "username", "password", "library_prefix", "connect_timeout",
                 "read_timeout", "header_timeout", "breaker_threshold", "breaker_cooldown",
                 "proxy")


def _upstream(name: str, raw: Any) -> UpstreamConfig:
    key = f"upstreams.{name}"
    t = take_keys(raw, key, set(UPSTREAM_KEYS))
    check_upstream_name(key, name)
    if "url" not in t:
        raise ConfigError(f"{key}.url", "missing (e.g. url = \"https://ghcr.io\")")
    aliases = t.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{key}.aliases", "expected a list of host names")
    username = t.get("username")
    password = t.get("password")
    if (username is None) != (password is None):
        raise ConfigError(f"{key}.password" if password is None else f"{key}.username",
                          "username and password must be given together")
    return UpstreamConfig(
        name=name,
        url=parse_url(f"{key}.url", t["url"]),
        aliases=tuple(a.lower() for a in aliases),
        username=str_value(f"{key}.username", username) if username is not None else None,
        password=str_value(f"{key}.password", password) if password is not None else None,
        library_prefix=bool_value(f"{key}.library_prefix", t.get("library_prefix", name == DOCKER_HUB)),
        connect_timeout=parse_duration(f"{key}.connect_timeout", t.get("connect_timeout", 5)),
        read_timeout=parse_duration(f"{key}.read_timeout", t.get("read_timeout", 30)),
        header_timeout=parse_duration(f"{key}.header_timeout", t.get("header_timeout", 5)),
        breaker_threshold=positive_int(f"{key}.breaker_threshold", t.get("breaker_threshold", 3)),
        breaker_cooldown=parse_duration(f"{key}.breaker_cooldown", t.get("breaker_cooldown", 30)),
        proxy=(None if "proxy" not in t else "" if t["proxy"] == ""
               else parse_url(f"{key}.proxy", t["proxy"])),
    )


def _s3(storage: dict[str, Any]) -> S3Config | None:
    backend = storage.get("backend", "filesystem")
    if backend not in ("filesystem", "s3"):
        raise ConfigError("storage.backend", f"expected \"filesystem\" or \"s3\", got {backend!r}")
    if backend == "filesystem":
        if "s3" in storage:
            raise ConfigError("storage.s3", "only used with storage.backend = \"s3\"")
        return None
    t = take_keys(storage.get("s3", {}), "storage.s3", {
        "bucket", "endpoint", "region", "prefix", "access_key", "secret_key",
        "addressing_style", "part_size", "redirect"})
    if "bucket" not in t:
        raise ConfigError("storage.s3.bucket", "required with storage.backend = \"s3\"")
    endpoint = t.get("endpoint")
    if endpoint is not None:
        endpoint = parse_url("storage.s3.endpoint", endpoint)
    style = t.get("addressing_style")
    if style is not None and style not in ("path", "virtual", "auto"):
        raise ConfigError("storage.s3.addressing_style", f"expected path, virtual or auto, got {style!r}")
    part_size = parse_size("storage.s3.part_size", t.get("part_size", 8 << 20))
    if part_size < 5 << 20:
        raise ConfigError("storage.s3.part_size", "S3 needs parts of at least 5 MiB")
    keys = {k: str_value(f"storage.s3.{k}", t[k]) for k in ("access_key", "secret_key") if k in t}
    if len(keys) == 1:
        raise ConfigError("storage.s3.secret_key" if "access_key" in keys else "storage.s3.access_key",
                          "set both keys, or neither (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return S3Config(
        bucket=str_value("storage.s3.bucket", t["bucket"]), endpoint_url=endpoint,
        region=str_value("storage.s3.region", t.get("region", "us-east-1")),
        prefix=str_value("storage.s3.prefix", t["prefix"]) if "prefix" in t else "",
        addressing_style=style,
        part_size=part_size, redirect=bool_value("storage.s3.redirect", t.get("redirect", False)),
        **keys)


def _cluster(raw: Any) -> ClusterConfig | None:
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
                                                  "max_size", "max_age", "backend", "url"})
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
    upstreams_raw = take_keys(top.get("upstreams", {}), "upstreams", set(top.get("upstreams", {})))

    host, port = parse_listen("server.listen", server["listen"])
    root = Path(str_value("storage.root", storage["root"]))
    if not root.is_absolute():
        root = base_dir / root

    upstreams = {name: _upstream(name, raw) for name, raw in upstreams_raw.items()}
    seen: dict[str, str] = {}
    for up in upstreams.values():
        for alias in (up.name, *up.aliases):
            if alias in seen and seen[alias] != up.name:
                raise ConfigError(f"upstreams.{up.name}.aliases",
                                  f"{alias!r} is already used by upstream {seen[alias]!r}")
            seen[alias] = up.name

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

    s3 = _s3(storage)
    cluster = _cluster(top.get("cluster"))
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
    if "tls" in top or "auth" in top:  # the edge modules import this one: import them late
        from proxy.auth.settings import parse_auth
        from proxy.tls import parse_tls

        cfg = replace(cfg, tls=parse_tls(top["tls"], base_dir) if "tls" in top else None,
                      auth=parse_auth(top["auth"], base_dir) if "auth" in top else None)
    return cfg


def load(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or the embedded defaults when ``None``), then apply the environment's
    ``REGISTRY_*``/``REGPROXY_*`` overrides (:mod:`proxy.envconfig`; ``env`` defaults to
    ``os.environ``)."""
    from proxy.envconfig import with_env

    env = os.environ if env is None else env
    if path is None:
        return with_env({}, env, Path("."))
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return with_env(data, env, path.resolve().parent)
