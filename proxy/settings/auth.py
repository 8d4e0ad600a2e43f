"""``[auth]`` of ``config.toml``: who may do what, and how clients prove who they are.

The htpasswd file is read here once (:func:`proxy.auth.htpasswd.read_htpasswd`, which
imports nothing but the field module's error), so a bad entry stops start-up.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.auth.htpasswd import read_htpasswd
from proxy.settings.fields import (
    ConfigError,
    IPNetwork,
    parse_duration,
    parse_url,
    path_value,
    str_value,
    take_keys,
)

ACTIONS = ("pull", "push", "delete")
#: The right to see the operational pages (``/``, ``/status``, ``/status.json``, ``/metrics``):
#: not per repository, so it is granted by a rule of its own without ``repositories``.
OPS = "ops"
#: A repository pattern: a local repository name where ``*`` matches within one component
#: and ``**`` (a whole component) any number of components. ``:`` for ``host:port`` prefixes.
_PATTERN_RE = re.compile(r"[a-z0-9._*:-]+(?:/[a-z0-9._*:-]+)*")
_USER_RE = re.compile(r"[^:\s]+")


@dataclass(frozen=True)
class Rule:
    """``[[auth.rules]]``: ``users``/``groups`` may do ``actions`` on ``repositories``, or,
    for ``actions = ["ops"]`` (and no repositories), see the operational pages."""

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    repositories: tuple[str, ...] = ()
    actions: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AuthConfig:
    """Edge authentication and access control; ``Config.auth is None`` means open access."""

    htpasswd: Path | None = None
    realm: str = "regproxy"
    anonymous_pull: tuple[str, ...] = ()
    anonymous_networks: tuple[IPNetwork, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    mode: str = "basic"  #: "basic" (htpasswd on every request) or "token" (bearer tokens)
    token_key: Path = Path("certs/token.key")
    token_ttl: float = 300.0
    token_realm: str | None = None  #: default: <scheme>://<Host header>/auth/token
    service: str = "regproxy"
    cache_ttl: float = 60.0  #: how long a successful password check is remembered
    #: failed logins allowed per client address (IPv6: per /64) and per user within
    #: ``login_window``, then 429 (proxy/auth/throttle.py); 0 turns that budget off
    login_failures_per_address: int = 10
    login_failures_per_user: int = 50
    login_window: float = 600.0


def parse_pattern(key: str, value: Any) -> str:
    if (not isinstance(value, str) or not _PATTERN_RE.fullmatch(value)
            or any("**" in c and c != "**" for c in value.split("/"))):
        raise ConfigError(key, f"expected a repository pattern such as \"library/*\" or "
                               f"\"ghcr.io/**\", got {value!r}")
    return value


def _str_list(key: str, value: Any, check=None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return tuple(check(key, v) if check else v for v in value)


def _user(key: str, value: str) -> str:
    if not _USER_RE.fullmatch(value):
        raise ConfigError(key, f"not a valid user name: {value!r}")
    return value


def _network(key: str, value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(key, f"expected an address or network such as \"10.0.0.0/8\", "
                               f"got {value!r}") from None
    return value


def _budget(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1_000_000:
        raise ConfigError(key, f"expected a number of failed logins (0: no limit), got {value!r}")
    return value


def parse_auth(raw: Any, base_dir: Path) -> AuthConfig:
    """Validate ``[auth]``; the htpasswd file is read here so bad entries stop start-up."""
    t = take_keys(raw, "auth", {"htpasswd", "realm", "anonymous_pull", "anonymous_networks", "groups",
                            "rules", "mode", "token_key", "token_ttl", "token_realm", "service",
                            "cache_ttl", "login_failures_per_address", "login_failures_per_user",
                            "login_window"})

    htpasswd = path_value("auth.htpasswd", t["htpasswd"], base_dir) if "htpasswd" in t else None
    if htpasswd is not None:
        read_htpasswd(htpasswd)  # raises ConfigError naming the file and line
    realm = str_value("auth.realm", t.get("realm", "regproxy"))
    if '"' in realm or "\\" in realm:
        raise ConfigError("auth.realm", "may not contain quotes or backslashes")

    groups_raw = take_keys(t.get("groups", {}), "auth.groups", set(t.get("groups", {}) or {}))
    groups = {g: _str_list(f"auth.groups.{g}", members, _user) for g, members in groups_raw.items()}

    rules_raw = t.get("rules", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("auth.rules", "expected [[auth.rules]] tables")
    rules = []
    for i, r in enumerate(rules_raw):
        key = f"auth.rules[{i}]"
        r = take_keys(r, key, {"users", "groups", "repositories", "actions"})
        users = _str_list(f"{key}.users", r.get("users", []))
        rule_groups = _str_list(f"{key}.groups", r.get("groups", []))
        for g in rule_groups:
            if g not in groups:
                raise ConfigError(f"{key}.groups", f"group {g!r} is not defined in [auth.groups]")
        if not users and not rule_groups:
            raise ConfigError(key, "needs users = [...] or groups = [...] (\"*\" = any signed-in user)")
        actions = _str_list(f"{key}.actions", r.get("actions", ["pull"]))
        for a in actions:
            if a not in ACTIONS and a not in ("*", OPS):
                raise ConfigError(f"{key}.actions",
                                  f"unknown action {a!r} (allowed: pull, push, delete, *, ops)")
        if OPS in actions:
            if "repositories" in r or len(set(actions)) > 1:
                raise ConfigError(f"{key}.actions", "ops is not per-repository: grant it in a rule "
                                                    "of its own, without repositories")
            rules.append(Rule(users=users, groups=rule_groups, actions=frozenset({OPS})))
            continue
        if "repositories" not in r:
            raise ConfigError(f"{key}.repositories", "missing (e.g. repositories = [\"team/*\"])")
        repos = _str_list(f"{key}.repositories", r["repositories"], parse_pattern)
        acts = frozenset(ACTIONS) if "*" in actions else frozenset(actions)  # "*": not ops
        rules.append(Rule(users=users, groups=rule_groups, repositories=repos, actions=acts))

    mode = t.get("mode", "basic")
    if mode not in ("basic", "token"):
        raise ConfigError("auth.mode", f"expected \"basic\" or \"token\", got {mode!r}")
    token_realm = t.get("token_realm")
    if token_realm is not None:
        token_realm = parse_url("auth.token_realm", token_realm)
    service = str_value("auth.service", t.get("service", "regproxy"))
    if '"' in service or "\\" in service:
        raise ConfigError("auth.service", "may not contain quotes or backslashes")
    budgets = {k: _budget(f"auth.{k}", t.get(k, default)) for k, default in
               (("login_failures_per_address", 10), ("login_failures_per_user", 50))}
    window = parse_duration("auth.login_window", t.get("login_window", 600))
    if not 1 <= window <= 86400:
        raise ConfigError("auth.login_window", "expected between 1 s and 1 d")
    ttl = parse_duration("auth.token_ttl", t.get("token_ttl", 300))
    if not 10 <= ttl <= 86400:
        raise ConfigError("auth.token_ttl", "expected between 10 s and 1 d")
    return AuthConfig(
        htpasswd=htpasswd,
        realm=realm,
        anonymous_pull=_str_list("auth.anonymous_pull", t.get("anonymous_pull", []), parse_pattern),
        anonymous_networks=tuple(
            ipaddress.ip_network(n, strict=False)
            for n in _str_list("auth.anonymous_networks", t.get("anonymous_networks", []), _network)),
        groups=groups,
        rules=tuple(rules),
        mode=mode,
        token_key=path_value("auth.token_key", t.get("token_key", "certs/token.key"), base_dir),
        token_ttl=ttl,
        token_realm=token_realm,
        service=service,
        cache_ttl=parse_duration("auth.cache_ttl", t.get("cache_ttl", 60)),
        login_window=window,
        **budgets,
    )


__all__ = ["ACTIONS", "OPS", "AuthConfig", "Rule", "parse_auth", "parse_pattern"]
