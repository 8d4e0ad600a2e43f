"""The field parsers every section of ``config.toml`` shares, and :class:`ConfigError`.

Every problem is reported as ``<key>: <problem>`` in one line, so an operator can fix the
file without reading code; a table holding an unknown key is refused too (a typo must not
silently fall back to a default).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.redact import redact_url
from proxy.untrusted import parse_digits

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration problem, naming the key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


def take_keys(table: Any, prefix: str, allowed: set[str]) -> dict[str, Any]:
    """A config table, refused when it is not one or holds a key outside ``allowed`` (a typo
    must not be ignored silently)."""
    if not isinstance(table, dict):
        raise ConfigError(prefix, "expected a table")
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{prefix}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return table


def str_value(key: str, value: Any) -> str:
    """A non-empty string setting, or a ConfigError naming ``key``."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def bool_value(key: str, value: Any) -> bool:
    """``true`` or ``false`` (TOML booleans only: ``"yes"`` or ``1`` are typos here)."""
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def choice_value(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def positive_int(key: str, value: Any) -> int:
    """An integer of at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, f"expected a positive integer, got {value!r}")
    return value


def count_value(key: str, value: Any) -> int:
    """A limit: an integer of at least 0, where 0 means no limit."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(key, f"expected a number (0 for no limit), got {value!r}")
    return value


def path_value(key: str, value: Any, base_dir: Path) -> Path:
    """A file path, ``~`` expanded; a relative one resolves against ``base_dir`` (the config
    file's directory), so the file means the same whatever the working directory."""
    p = Path(str_value(key, value)).expanduser()
    return p if p.is_absolute() else base_dir / p


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6,
               "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12,
               "tb": 10**12, "tib": 1 << 40}
_DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(key: str, value: Any) -> int:
    """``4194304``, ``"4MiB"``, ``"50GiB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(key, f"expected a size such as 4194304 or \"4MiB\", got {value!r}")


def parse_duration(key: str, value: Any) -> float:
    """``300``, ``"5m"``, ``"1h"``, ``"250ms"`` -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value)
        if m and m.group(2) in _DURATION_UNITS:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(key, f"expected a duration such as 300 or \"5m\", got {value!r}")


def parse_min_free(key: str, value: Any) -> tuple[int, float]:
    """``"1GiB"`` (bytes) or ``"5%"`` (of the disk) -> (bytes, percent)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)
        if m and float(m.group(1)) <= 100:
            return 0, float(m.group(1))
        raise ConfigError(key, f"expected a percentage from 0% to 100%, got {value!r}")
    return parse_size(key, value), 0.0


def parse_listen(key: str, value: Any) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` -> (host, port)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
        if m:
            host = m.group(1) if m.group(1) is not None else m.group(3)
            port = int(m.group(2) or m.group(4))
            if 0 <= port <= 65535:
                return host or "0.0.0.0", port
    raise ConfigError(key, f"expected HOST:PORT such as \"127.0.0.1:5000\", got {value!r}")


def parse_workers(key: str, value: Any) -> int:
    """A worker count: a positive integer, or ``"auto"`` for one per CPU."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str) and (number := parse_digits(value.strip(), 2)) is not None:
        value = number
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
        return value
    raise ConfigError(key, f"expected a number of worker processes (1-64) or \"auto\", got {value!r}")


def parse_url(key: str, value: Any) -> str:
    """An http(s) base URL without query, fragment or credentials, trailing slash removed.

    Any userinfo is refused (``http://:pw@host`` too): a URL is shown on the status page and
    in logs, so credentials belong in their own keys. Errors never echo the secret."""
    if isinstance(value, str):
        try:
            parts = urlsplit(value)
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            parts, port_ok = None, False
        if parts is not None and "@" in parts.netloc:
            raise ConfigError(key, f"credentials in the URL are not accepted ({redact_url(value)!r}); "
                                   "use the username/password keys")
        if (parts is not None and port_ok and parts.scheme in ("http", "https") and parts.hostname
                and not parts.query and not parts.fragment):
            return value.rstrip("/")
        value = redact_url(value)
    raise ConfigError(key, f"expected an http(s) URL without credentials, query or fragment, "
                           f"got {value!r}")


def parse_networks(key: str, value: Any) -> tuple[IPNetwork, ...]:
    """A list of addresses or networks: ``["10.0.0.0/8", "192.0.2.7", "fd00::/8"]``."""
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list such as [\"10.0.0.0/8\"], got {value!r}")
    networks = []
    for item in value:
        try:
            if not isinstance(item, str):
                raise TypeError(item)
            networks.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected an address or network such as \"10.0.0.0/8\", "
                                   f"got {item!r}") from None
    return tuple(networks)
