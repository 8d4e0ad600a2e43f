"""Per-repository access control: which actions a user (or anonymous client) has on a name.

Patterns are matched against the **local repository name**, the name the router computes
(:attr:`proxy.routing.Route.name`) and ``_catalog`` lists: ``library/alpine`` for the default
upstream (``?ns=docker.io`` + ``alpine`` and ``/v2/docker.io/library/alpine`` included),
``ghcr.io/org/img`` for other upstreams, the plain name for hosted repositories. So one
pattern covers every way of addressing the same content.

* ``anonymous_pull`` patterns grant *pull* to everyone (signed-in users too), optionally only
  to clients in ``anonymous_networks``.
* Without ``[[auth.rules]]``, every signed-in user may pull, push and delete everything.
  With rules, a signed-in user has what the rules naming them (directly, through a group,
  or with ``users = ["*"]``) grant, plus anonymous pull.
* The ``ops`` right (the status pages and metrics) is not per repository: a rule with
  ``actions = ["ops"]`` grants it to its users; without rules every signed-in user has it,
  anonymous clients never.
"""

from __future__ import annotations

import ipaddress
import re

from proxy.routing import compile_patterns
from proxy.settings.auth import ACTIONS, OPS, AuthConfig

ALL = frozenset(ACTIONS)
NONE: frozenset[str] = frozenset()


class AccessControl:
    """Answers "which actions may ``user`` (``None`` = anonymous) perform on ``name``"."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._anonymous = compile_patterns(config.anonymous_pull)
        self._networks = config.anonymous_networks
        member_of: dict[str, set[str]] = {}
        for group, members in config.groups.items():
            for m in members:
                member_of.setdefault(m, set()).add(group)
        self._member_of = member_of
        self._rules: list[tuple[frozenset[str], frozenset[str], re.Pattern[str] | None, frozenset[str]]] = [
            (frozenset(r.users), frozenset(r.groups), compile_patterns(r.repositories), r.actions)
            for r in config.rules if OPS not in r.actions
        ]
        self._operators = [(frozenset(r.users), frozenset(r.groups))
                           for r in config.rules if OPS in r.actions]
        self._open = not config.rules

    def anonymous_allowed_from(self, remote: str | None) -> bool:
        """Whether anonymous pull exists at all for a client at ``remote``."""
        if self._anonymous is None:
            return False
        if not self._networks:
            return True
        try:
            addr = ipaddress.ip_address((remote or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._networks)

    def actions(self, user: str | None, name: str, remote: str | None) -> frozenset[str]:
        """The actions granted on repository ``name``."""
        granted: set[str] = set()
        if self._anonymous is not None and self._anonymous.fullmatch(name) \
                and self.anonymous_allowed_from(remote):
            granted.add("pull")
        if user is None:
            return frozenset(granted)
        if self._open:
            return ALL
        groups = self._member_of.get(user, set())
        for users, rule_groups, pattern, actions in self._rules:
            if (user in users or "*" in users or groups & rule_groups) \
                    and pattern is not None and pattern.fullmatch(name):
                granted |= actions
        return frozenset(granted)

    def may_operate(self, user: str | None) -> bool:
        """Whether ``user`` has the ``ops`` right (anonymous clients never have it)."""
        if user is None:
            return False
        if self._open:
            return True
        groups = self._member_of.get(user, set())
        return any(user in users or "*" in users or groups & rule_groups
                   for users, rule_groups in self._operators)
