"""Environment overrides, applied to the parsed ``config.toml`` before validation.

Precedence: built-in defaults < ``config.toml`` < environment < command-line flags.

* The distribution registry's variables, so existing deployments keep working:
  ``REGISTRY_AUTH=htpasswd``, ``REGISTRY_AUTH_HTPASSWD_REALM``, ``REGISTRY_AUTH_HTPASSWD_PATH``,
  ``REGISTRY_HTTP_ADDR``, ``REGISTRY_HTTP_DEBUG_ADDR``, ``REGISTRY_HTTP_TLS_CERTIFICATE``,
  ``REGISTRY_HTTP_TLS_KEY``, ``REGISTRY_HTTP_TLS_CLIENTCAS_0``,
  ``REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY`` and the s3
  driver's ``REGISTRY_STORAGE_S3_{BUCKET,REGION,REGIONENDPOINT,ACCESSKEY,SECRETKEY,
  ROOTDIRECTORY}`` (they select ``storage.backend = "s3"``). Other
  ``REGISTRY_*`` variables are ignored (``REGISTRY_AUTH_FILE`` belongs to podman/skopeo).
* ``REGPROXY_<SECTION>_<KEY>`` for any key of the sections ``server``, ``storage``, ``cache``,
  ``proxy``, ``hosted``, ``tls``, ``auth`` and ``cluster``, and ``REGPROXY_STORAGE_S3_<KEY>``
  for ``[storage.s3]`` (``REGPROXY_CACHE_TAG_TTL=10m``, ``REGPROXY_CLUSTER_SECRET=...``,
  ``REGPROXY_AUTH_ANONYMOUS_PULL='["library/*"]'``). The value is read as a TOML value when it
  is one (``true``, ``300``, ``["a"]``) and as a string otherwise. Tables (``upstreams``,
  ``auth.groups``, ``auth.rules``) are not settable this way.

Paths given in the environment are relative to the working directory, not the config file.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.config import ConfigError

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
SECTIONS = ("server", "storage", "cache", "proxy", "hosted", "tls", "auth", "cluster")
#: Sub-tables settable as ``REGPROXY_<SECTION>_<TABLE>_<KEY>``.
SUBTABLES = {("storage", "s3")}
PATH_KEYS = {("storage", "root"), ("tls", "cert"), ("tls", "key"), ("tls", "client_ca"),
             ("auth", "htpasswd"), ("auth", "token_key")}
PREFIX = "REGPROXY_"


def _value(section: str, key: str, raw: str) -> Any:
    if (section, key) in PATH_KEYS:
        if not raw:
            raise ConfigError(f"{section}.{key}", "empty path in the environment")
        return str(Path(raw).expanduser().absolute())
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``data`` (parsed TOML) with the environment's overrides applied."""
    out = copy.deepcopy(data)

    def put(path: tuple[str, ...], value: Any, var: str) -> None:
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
    for var in sorted(env):
        if not var.startswith(PREFIX):
            continue
        section, _, key = var[len(PREFIX):].lower().partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(var, f"not a setting: expected {PREFIX}<SECTION>_<KEY> with a section "
                                   f"of {', '.join(SECTIONS)}")
        target: tuple[str, ...] = (section, key)
        sub, _, rest = key.partition("_")
        if (section, sub) in SUBTABLES and rest:
            target = (section, sub, rest)
        put(target, _value(section, key, env[var]), var)
    auth = env.get("REGISTRY_AUTH")
    if auth is not None:
        if auth.strip().lower() != "htpasswd":
            raise ConfigError("REGISTRY_AUTH", f"only \"htpasswd\" is supported, got {auth!r}")
        if "htpasswd" not in out.get("auth", {}):
            raise ConfigError("REGISTRY_AUTH", "htpasswd needs REGISTRY_AUTH_HTPASSWD_PATH "
                                               "(or auth.htpasswd in the config file)")
    return out
