"""Environment overrides, applied to the parsed ``config.toml`` before validation.

Precedence: built-in defaults < ``config.toml`` < environment < command-line flags.

* The distribution registry's variables, so existing deployments keep working:
  ``REGISTRY_AUTH=htpasswd``, ``REGISTRY_AUTH_HTPASSWD_REALM``, ``REGISTRY_AUTH_HTPASSWD_PATH``,
  ``REGISTRY_HTTP_ADDR``, ``REGISTRY_HTTP_TLS_CERTIFICATE``, ``REGISTRY_HTTP_TLS_KEY``,
  ``REGISTRY_HTTP_TLS_CLIENTCAS_0``, ``REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY``. Other
  ``REGISTRY_*`` variables are ignored (``REGISTRY_AUTH_FILE`` belongs to podman/skopeo).
* ``REGPROXY_<SECTION>_<KEY>`` for any key of the sections ``server``, ``storage``, ``cache``,
  ``proxy``, ``hosted``, ``tls`` and ``auth`` (``REGPROXY_CACHE_TAG_TTL=10m``,
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

DISTRIBUTION_VARS: dict[str, tuple[str, str]] = {
    "REGISTRY_AUTH_HTPASSWD_REALM": ("auth", "realm"),
    "REGISTRY_AUTH_HTPASSWD_PATH": ("auth", "htpasswd"),
    "REGISTRY_HTTP_ADDR": ("server", "listen"),
    "REGISTRY_HTTP_TLS_CERTIFICATE": ("tls", "cert"),
    "REGISTRY_HTTP_TLS_KEY": ("tls", "key"),
    "REGISTRY_HTTP_TLS_CLIENTCAS_0": ("tls", "client_ca"),
    "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": ("storage", "root"),
}
SECTIONS = ("server", "storage", "cache", "proxy", "hosted", "tls", "auth")
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

    def put(section: str, key: str, value: Any, var: str) -> None:
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(var, f"[{section}] in the config file is not a table")
        table[key] = value

    for var, (section, key) in DISTRIBUTION_VARS.items():
        if var in env:
            put(section, key, _value(section, key, env[var]), var)
    for var in sorted(env):
        if not var.startswith(PREFIX):
            continue
        section, _, key = var[len(PREFIX):].lower().partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(var, f"not a setting: expected {PREFIX}<SECTION>_<KEY> with a section "
                                   f"of {', '.join(SECTIONS)}")
        put(section, key, _value(section, key, env[var]), var)
    auth = env.get("REGISTRY_AUTH")
    if auth is not None:
        if auth.strip().lower() != "htpasswd":
            raise ConfigError("REGISTRY_AUTH", f"only \"htpasswd\" is supported, got {auth!r}")
        if "htpasswd" not in out.get("auth", {}):
            raise ConfigError("REGISTRY_AUTH", "htpasswd needs REGISTRY_AUTH_HTPASSWD_PATH "
                                               "(or auth.htpasswd in the config file)")
    return out
