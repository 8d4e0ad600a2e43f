"""The one source of configuration defaults, and how a file is merged over them.

``DEFAULTS`` is what the shipped ``config.toml`` says, key for key (a test holds the two
equal). A configuration file, and the environment, are merged over it key by key: a file
with only ``[server]`` keeps every other default, the upstreams included, and
``[upstreams."docker.io"]`` with just ``username``/``password`` adds credentials to the
default Docker Hub upstream. ``"<name>" = false`` under ``[upstreams]`` removes an upstream
(a default one included).
"""

from __future__ import annotations

import copy
from typing import Any

DEFAULTS: dict[str, Any] = {
    "server": {"listen": "127.0.0.1:5000", "access_log": True, "workers": 1,
               "shutdown_grace": "30s", "log_level": "INFO", "log_format": "text",
               "trusted_proxies": []},
    "storage": {"root": "./data", "backend": "filesystem", "min_free": "1GiB"},
    "cache": {
        "tag_ttl": "5m", "tag_stale_while_revalidate": "30s", "manifest_memory": "64MiB",
        "max_manifest_size": "4MiB", "max_size": 0, "max_age": 0, "backend": "memory",
        "prefetch": "layers", "prefetch_concurrency": 16, "prefetch_max_bytes": "2GiB",
    },
    "proxy": {"default_upstream": "docker.io", "default_platform": "linux/amd64"},
    "hosted": {
        "repositories": [], "delete_enabled": True, "upload_max_age": "24h",
        "max_uploads_per_repository": 64, "max_uploads_per_user": 256,
    },
    "upstreams": {
        "docker.io": {
            "url": "https://registry-1.docker.io",
            "aliases": ["index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"],
        },
        "ghcr.io": {"url": "https://ghcr.io"},
        "quay.io": {"url": "https://quay.io"},
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge key by key, anything else replaces; the
    keys of ``over`` come first (the file's upstreams before the remaining defaults)."""
    out: dict[str, Any] = {}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = copy.deepcopy(value)
    for key, value in base.items():
        out.setdefault(key, copy.deepcopy(value))
    return out


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Parsed TOML merged over :data:`DEFAULTS`. Upstreams set to ``false`` are dropped;
    the default ``proxy.default_upstream`` goes with its upstream when that is dropped (a
    file naming a dropped upstream as its default still gets the error)."""
    if not isinstance(data.get("upstreams", {}), dict):
        return copy.deepcopy({**DEFAULTS, **data})  # let the parser report the bad table
    merged = _merge(DEFAULTS, data)
    ups = merged["upstreams"]
    merged["upstreams"] = {name: raw for name, raw in ups.items() if raw is not False}
    for name, raw in data.get("upstreams", {}).items():  # a given urls replaces a default url
        if isinstance(raw, dict) and "urls" in raw and "url" not in raw and name in merged["upstreams"]:
            merged["upstreams"][name].pop("url", None)
    proxy, given = merged.get("proxy"), data.get("proxy")
    chosen = given.get("default_upstream") if isinstance(given, dict) else None
    if (isinstance(proxy, dict) and chosen is None
            and proxy.get("default_upstream") not in merged["upstreams"]):
        proxy.pop("default_upstream", None)
    return merged
