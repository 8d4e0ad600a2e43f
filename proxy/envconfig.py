"""Environment overrides, applied to the parsed ``config.toml`` before validation.

They work on the raw tables (:func:`apply_env`), below the parsers; only distribution's
``REGISTRY_PROXY_*`` need the parsed upstreams (:func:`proxy_remote`, applied by
:func:`proxy.config.load`).

Precedence: built-in defaults < ``config.toml`` < environment < command-line flags.

* The distribution registry's variables, so a ``registry:2`` deployment keeps working:
  ``REGISTRY_AUTH=htpasswd``, ``REGISTRY_AUTH_HTPASSWD_REALM``, ``REGISTRY_AUTH_HTPASSWD_PATH``,
  ``REGISTRY_HTTP_ADDR``, ``REGISTRY_HTTP_DEBUG_ADDR``, ``REGISTRY_HTTP_TLS_CERTIFICATE``,
  ``REGISTRY_HTTP_TLS_KEY``, ``REGISTRY_HTTP_TLS_CLIENTCAS_0``,
  ``REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY``, the s3 driver's
  ``REGISTRY_STORAGE_S3_{BUCKET,REGION,REGIONENDPOINT,ACCESSKEY,SECRETKEY,ROOTDIRECTORY}``
  (they select ``storage.backend = "s3"``), and the proxy's ``REGISTRY_PROXY_REMOTEURL``
  (the default upstream, as ``--upstream`` sets it) with ``REGISTRY_PROXY_USERNAME`` and
  ``REGISTRY_PROXY_PASSWORD`` (its credentials). Other variables of distribution's
  configuration sections get a warning naming them (never their values): they would be
  silently ignored otherwise. ``REGISTRY_AUTH_FILE`` (podman/skopeo) and a Kubernetes
  Service's ``REGISTRY_PORT``/``REGISTRY_SERVICE_*`` are not distribution's and stay quiet.
* ``REGPROXY_<SECTION>_<KEY>`` for any key of the sections ``server``, ``storage``, ``cache``,
  ``proxy``, ``hosted``, ``tls``, ``auth`` and ``cluster``, and ``REGPROXY_STORAGE_S3_<KEY>``
  for ``[storage.s3]`` (``REGPROXY_CACHE_TAG_TTL=10m``, ``REGPROXY_CLUSTER_SECRET=...``,
  ``REGPROXY_AUTH_ANONYMOUS_PULL='["library/*"]'``). The value is read as a TOML value when it
  is one (``true``, ``300``, ``["a"]``) and as a string otherwise; credentials and URLs are
  always strings. ``auth.groups`` and ``auth.rules`` are not settable this way.
* ``REGPROXY_UPSTREAMS_<ID>_<KEY>`` for the keys of ``[upstreams."<name>"]``. ``<ID>`` is the
  upstream's name upper-cased with each ``.``, ``-`` and ``:`` written ``_`` (``docker.io``:
  ``DOCKER_IO``; ``registry.internal:5000``: ``REGISTRY_INTERNAL_5000``) and names an
  upstream of the file or the defaults; for a new one, ``REGPROXY_UPSTREAMS_<ID>_NAME`` gives
  its name (without it, ``_`` reads as ``.``: ``REGPROXY_UPSTREAMS_GCR_IO_URL`` makes
  ``gcr.io``). ``REGPROXY_UPSTREAMS_<ID>=false`` removes an upstream.
* Secrets from files: each of these variables may instead be given as ``<VAR>_FILE``, the
  path of a file holding the value (one trailing newline dropped), as Docker and Kubernetes
  secrets are mounted: ``REGISTRY_PROXY_PASSWORD_FILE=/run/secrets/hub``.

Paths given in the environment are relative to the working directory, not the config file.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.defaults import DEFAULTS
from proxy.settings.fields import ConfigError, parse_url
from proxy.settings.upstreams import UPSTREAM_KEYS

DISTRIBUTION_VARS: dict[str, tuple[str, ...]] = {
    "REGISTRY_AUTH_HTPASSWD_REALM": ("auth", "realm"),
    "REGISTRY_AUTH_HTPASSWD_PATH": ("auth", "htpasswd"),
    "REGISTRY_HTTP_ADDR": ("server", "listen"),
    "REGISTRY_HTTP_DEBUG_ADDR": ("server", "debug_listen"),
    "REGISTRY_HTTP_TLS_CERTIFICATE": ("tls", "cert"),
    "REGISTRY_HTTP_TLS_KEY": ("tls", "key"),
    "REGISTRY_HTTP_TLS_CLIENTCAS_0": ("tls", "client_ca"),
    "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": ("storage", "root"),
    # distribution's s3 driver; any of them selects storage.backend = "s3"
    "REGISTRY_STORAGE_S3_BUCKET": ("storage", "s3", "bucket"),
    "REGISTRY_STORAGE_S3_REGION": ("storage", "s3", "region"),
    "REGISTRY_STORAGE_S3_REGIONENDPOINT": ("storage", "s3", "endpoint"),
    "REGISTRY_STORAGE_S3_ACCESSKEY": ("storage", "s3", "access_key"),
    "REGISTRY_STORAGE_S3_SECRETKEY": ("storage", "s3", "secret_key"),
    "REGISTRY_STORAGE_S3_ROOTDIRECTORY": ("storage", "s3", "prefix"),
}
#: distribution's proxy section: the default upstream and its credentials (applied to the
#: parsed configuration, as ``--upstream`` is: :class:`ProxyRemote`).
PROXY_URL, PROXY_USER, PROXY_PASSWORD = (
    "REGISTRY_PROXY_REMOTEURL", "REGISTRY_PROXY_USERNAME", "REGISTRY_PROXY_PASSWORD")
SECTIONS = ("server", "storage", "cache", "proxy", "hosted", "tls", "auth", "cluster")
#: Sub-tables settable as ``REGPROXY_<SECTION>_<TABLE>_<KEY>``.
SUBTABLES = {("storage", "s3")}
PATH_KEYS = {("storage", "root"), ("tls", "cert"), ("tls", "key"), ("tls", "client_ca"),
             ("auth", "htpasswd"), ("auth", "token_key")}
#: Keys whose values are taken as they are, never as TOML (a password ``12345`` or ``true``).
VERBATIM_KEYS = {"url", "username", "password", "secret", "secret_key", "access_key",
                 "advertise_url", "endpoint", "name", "proxy"}
PREFIX = "REGPROXY_"
UPSTREAMS = PREFIX + "UPSTREAMS_"

#: distribution's configuration sections: a ``REGISTRY_<SECTION>...`` variable configures it.
_DISTRIBUTION_SECTIONS = ("VERSION", "LOG", "LOGLEVEL", "STORAGE", "AUTH", "MIDDLEWARE",
                          "REPORTING", "HTTP", "NOTIFICATIONS", "REDIS", "HEALTH", "PROXY",
                          "COMPATIBILITY", "VALIDATION", "POLICY", "CATALOG")
#: Not distribution's: podman/skopeo/buildah's credentials file.
_NOT_DISTRIBUTION = {"REGISTRY_AUTH_FILE"}
#: What to use instead, for the variables operators set most.
_INSTEAD = {
    "REGISTRY_PROXY_TTL": "cached content is kept by cache.max_size/cache.max_age, and tags "
                          "are revalidated after cache.tag_ttl",
    "REGISTRY_STORAGE_DELETE_ENABLED": "hosted.delete_enabled (default true)",
    "REGISTRY_LOG_LEVEL": "server.log_level (REGPROXY_SERVER_LOG_LEVEL) or --log-level",
    "REGISTRY_LOGLEVEL": "server.log_level (REGPROXY_SERVER_LOG_LEVEL) or --log-level",
    "REGISTRY_LOG_FORMATTER": "server.log_format = \"json\" (REGPROXY_SERVER_LOG_FORMAT=json)",
    "REGISTRY_HTTP_SECRET": "not needed: upload state is kept in the store",
    "REGISTRY_REDIS_ADDR": "cache.backend = \"redis\" with cache.url",
}


def env_id(name: str) -> str:
    """An upstream's name as it appears in ``REGPROXY_UPSTREAMS_<ID>_...``."""
    return re.sub(r"[.:-]", "_", name).upper()


def resolve_files(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with each ``<VAR>_FILE`` of a variable read here replaced by ``<VAR>`` = the
    file's content (one trailing newline dropped)."""
    out = dict(env)
    for var, path in env.items():
        base = var.removesuffix("_FILE")
        if base == var or not (base.startswith(PREFIX) or base in DISTRIBUTION_VARS
                               or base in (PROXY_URL, PROXY_USER, PROXY_PASSWORD)):
            continue
        if base in env:
            raise ConfigError(var, f"set {base} or {var}, not both")
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise ConfigError(var, f"cannot read {path[:200]!r}: {reason}") from None
        out[base] = text.removesuffix("\n").removesuffix("\r")
        del out[var]
    return out


def unused_distribution_vars(env: Mapping[str, str]) -> list[str]:
    """Warnings for the ``REGISTRY_*`` variables of distribution's configuration that are
    not honoured here; they name the variable, never its value."""
    honoured = {*DISTRIBUTION_VARS, "REGISTRY_AUTH", PROXY_URL, PROXY_USER, PROXY_PASSWORD}
    out = []
    for var in sorted(env):
        section = var.removeprefix("REGISTRY_").split("_", 1)[0]
        if (var == section or var in honoured or var in _NOT_DISTRIBUTION
                or section not in _DISTRIBUTION_SECTIONS):
            continue
        hint = _INSTEAD.get(var, "see docs/configuration.md for what is supported")
        out.append(f"{var} is a registry:2 setting that regproxy does not use ({hint})")
    return out


def _value(section: str, key: str, raw: str) -> Any:
    if (section, key) in PATH_KEYS:
        if not raw:
            raise ConfigError(f"{section}.{key}", "empty path in the environment")
        return str(Path(raw).expanduser().absolute())
    if key in VERBATIM_KEYS:
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _upstream_vars(data: dict[str, Any], env: Mapping[str, str]
                   ) -> list[tuple[str, tuple[str, ...], Any]]:
    """``REGPROXY_UPSTREAMS_*`` as (variable, path in the TOML, value)."""
    keys = sorted((*UPSTREAM_KEYS, "name"), key=len, reverse=True)
    parsed: list[tuple[str, str, str | None]] = []  # (variable, ID, key or None)
    for var in sorted(env):
        if not var.startswith(UPSTREAMS):
            continue
        rest = var[len(UPSTREAMS):]
        key = next((k for k in keys if rest.endswith(f"_{k.upper()}") and len(rest) > len(k) + 1), None)
        ident = rest if key is None else rest[:-len(key) - 1]
        if key is None and env[var].strip().lower() != "false":
            raise ConfigError(var, f"not a setting: expected {UPSTREAMS}<NAME>_<KEY> with a key of "
                                   f"{', '.join(sorted(keys))}, or {UPSTREAMS}<NAME>=false")
        parsed.append((var, ident, key))
    file_ups = data.get("upstreams")
    known = [*(file_ups if isinstance(file_ups, dict) else {}), *DEFAULTS["upstreams"]]
    names: dict[str, str] = {}
    for var, ident, key in parsed:
        if key == "name":
            names[ident] = env[var].strip().lower()
        elif ident not in names:
            matches = sorted({n for n in known if env_id(n) == ident})
            if len(matches) > 1:
                raise ConfigError(var, f"names {' and '.join(matches)}; set {UPSTREAMS}{ident}_NAME")
            names[ident] = matches[0] if matches else ident.lower().replace("_", ".")
    out: list[tuple[str, tuple[str, ...], Any]] = []
    for var, ident, key in parsed:
        if key is None:
            out.append((var, ("upstreams", names[ident]), False))
        elif key != "name":
            out.append((var, ("upstreams", names[ident], key), _value("upstreams", key, env[var])))
    return out


def key_name(path: tuple[str, ...]) -> str:
    """A TOML key path as the file would write it: ``cache.tag_ttl``,
    ``upstreams."docker.io".url``."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"' for p in path)


def apply_env(data: dict[str, Any], env: Mapping[str, str],
              sources: dict[str, str] | None = None) -> dict[str, Any]:
    """A copy of ``data`` (parsed TOML) with the environment's overrides applied;
    ``sources`` gets each key set, as :func:`key_name` writes it, and the variable that
    set it."""
    env = resolve_files(env)
    out = copy.deepcopy(data)

    def put(path: tuple[str, ...], value: Any, var: str) -> None:
        if sources is not None:
            sources[key_name(path)] = f"environment ({var})"
        table = out
        for i, name in enumerate(path[:-1]):
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(var, f"[{'.'.join(path[:i + 1])}] in the config file is not a table")
        table[path[-1]] = value

    for var, path in DISTRIBUTION_VARS.items():
        if var in env:
            put(path, _value(path[0], path[-1], env[var]), var)
            if path[:2] == ("storage", "s3"):
                put(("storage", "backend"), "s3", var)
    for var, path, value in _upstream_vars(data, env):
        put(path, value, var)
    for var in sorted(env):
        if not var.startswith(PREFIX) or var.startswith(UPSTREAMS):
            continue
        section, _, key = var[len(PREFIX):].lower().partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(var, f"not a setting: expected {PREFIX}<SECTION>_<KEY> with a section "
                                   f"of {', '.join((*SECTIONS, 'upstreams'))}")
        target: tuple[str, ...] = (section, key)
        sub, _, rest = key.partition("_")
        if (section, sub) in SUBTABLES and rest:
            target = (section, sub, rest)
        put(target, _value(section, target[-1], env[var]), var)
    auth = env.get("REGISTRY_AUTH")
    if auth is not None:
        if auth.strip().lower() != "htpasswd":
            raise ConfigError("REGISTRY_AUTH", f"only \"htpasswd\" is supported, got {auth!r}")
        if "htpasswd" not in out.get("auth", {}):
            raise ConfigError("REGISTRY_AUTH", "htpasswd needs REGISTRY_AUTH_HTPASSWD_PATH "
                                               "(or auth.htpasswd in the config file)")
    return out


@dataclass(frozen=True)
class ProxyRemote:
    """distribution's ``REGISTRY_PROXY_*``: a URL for the default upstream (applied as
    ``--upstream`` is) and that upstream's credentials; ``None`` where not set. They need
    the parsed upstreams, so :func:`proxy.config.load` applies them after parsing."""

    url: str | None = None
    username: str | None = None
    password: str | None = None


def proxy_remote(env: Mapping[str, str]) -> ProxyRemote:
    """The ``REGISTRY_PROXY_*`` variables of ``env``, checked: the URL is an http(s) URL and
    the credentials come as a non-empty pair."""
    env = resolve_files(env)
    user, password = env.get(PROXY_USER), env.get(PROXY_PASSWORD)
    if (user is None) != (password is None):
        raise ConfigError(PROXY_PASSWORD if password is None else PROXY_USER,
                          f"{PROXY_USER} and {PROXY_PASSWORD} must be given together")
    url = parse_url(PROXY_URL, env[PROXY_URL]) if PROXY_URL in env else None
    if user is not None and password is not None and (not user or not password):
        raise ConfigError(PROXY_USER if not user else PROXY_PASSWORD, "empty")
    return ProxyRemote(url=url, username=user, password=password)
