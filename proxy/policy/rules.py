"""Allow/deny rules per upstream: which repositories, and which tags, may be fetched.

In ``config.toml``, under an upstream (parsed by :func:`parse_rules`)::

    [upstreams."docker.io"]
    rules_default = "deny"          # what a request that no rule matches gets
    rules = [
      { action = "deny",  tags = ["latest"], name = "no floating tags" },
      { action = "allow", repositories = ["library/*"], tag_regex = '\\d+(\\.\\d+){0,2}' },
      { action = "allow", repositories = ["bitnami/**"] },
    ]

**First match wins**: rules are tried in the order written and the first that applies
decides; when none applies, ``rules_default`` does. The decision names the rule
(``upstreams.docker.io.rules[0]``), so a ``DENIED`` answer says which line to change.
``rules_default`` is required as soon as there are rules: an allowlist and a denylist differ
only in it, and that is not left to a guess.

A rule applies to a request when its ``repositories`` match the repository's name **on the
upstream** (``library/alpine`` for Docker Hub's ``alpine``) and, for a pull by tag, its
tag condition matches:

* ``repositories``: patterns where ``*`` matches within one path component and ``**`` (a
  whole component) one or more components; the same language as ``hosted.repositories``
  and ``[auth]`` rules. ``org/**`` matches ``org/a`` and ``org/a/b``, not ``org`` itself.
  Left out: every repository.
* ``tags``: globs where ``*`` matches any characters (``v*``, ``*-alpine``); ``tag_regex``:
  a Python regular expression the *whole* tag must match. A rule may have both (either
  matching is enough); with neither, the rule applies to every tag.

A pull by digest (a manifest by digest, a blob, a referrers list) names content, not a
tag, so a tag condition cannot be checked: an ``allow`` rule with a tag condition applies
to it (the repository is allowed, for some tags at least) and a ``deny`` rule with a tag
condition does not. So "semver tags only" still lets a client fetch the layers of the
image a semver tag resolved to, and a client that knows the digest of ``latest`` can pull
it by digest: rules decide which *tags* are resolved, not which bytes exist. Tags that name
a digest's attachments (``sha256-<hex>``, cosign's ``.sig``/``.att``/``.sbom``, see
:mod:`proxy.policy.referrers`) are decided like a pull by digest, so a tag rule never hides
an allowed image's signatures.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import Denied
from proxy.policy.referrers import is_attached_tag
from proxy.settings.fields import ConfigError, take_keys

ALLOW, DENY = "allow", "deny"
RULE_KEYS = frozenset({"action", "repositories", "tags", "tag_regex", "name"})

#: A repository pattern: components of the name grammar's characters and ``*``.
_REPO_PATTERN = re.compile(r"[a-z0-9._*-]+(?:/[a-z0-9._*-]+)*")
#: A tag glob: the tag grammar's characters and ``*``.
_TAG_GLOB = re.compile(r"[a-zA-Z0-9._*-]{1,128}")


def compile_repository_patterns(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regex for ``patterns`` (use ``fullmatch``): ``*`` within a component, ``**`` a
    whole component standing for one or more components."""
    parts = []
    for pattern in patterns:
        comps = [r"[^/]+(?:/[^/]+)*" if comp == "**" else re.escape(comp).replace(r"\*", "[^/]*")
                 for comp in pattern.split("/")]
        parts.append("/".join(comps))
    return re.compile("|".join(f"(?:{p})" for p in parts))


def _compile_globs(globs: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for tag globs (``*``: any characters); ``None`` for none."""
    if not globs:
        return None
    return re.compile("|".join(re.escape(g).replace(r"\*", ".*") for g in globs))


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``rules`` entry, its patterns compiled once."""

    key: str  #: where it is written: ``upstreams.<name>.rules[<i>]``
    action: str  #: :data:`ALLOW` or :data:`DENY`
    repositories: tuple[str, ...] = ("**",)
    tags: tuple[str, ...] = ()
    tag_regex: str | None = None
    name: str | None = None
    _repos: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _globs: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the regex is compiled on its own: its inline flags must stay at its start
        object.__setattr__(self, "_repos", compile_repository_patterns(self.repositories))
        object.__setattr__(self, "_globs", _compile_globs(self.tags))
        object.__setattr__(self, "_regex", None if self.tag_regex is None else re.compile(self.tag_regex))

    def applies(self, repository: str, tag: str | None) -> bool:
        """Whether this rule decides a request for ``repository`` by ``tag`` (``None``: by
        digest; see the module docstring for why tag conditions treat it as they do)."""
        if self._repos.fullmatch(repository) is None:
            return False
        if self._globs is None and self._regex is None:
            return True
        if tag is None:
            return self.action == ALLOW
        return ((self._globs is not None and self._globs.fullmatch(tag) is not None)
                or (self._regex is not None and self._regex.fullmatch(tag) is not None))

    def describe(self) -> str:
        """The rule in a few words, for a ``DENIED`` message and logs."""
        if self.name:
            return self.name
        words = [self.action, " ".join(self.repositories)]
        if self.tags:
            words.append("tags " + " ".join(self.tags))
        if self.tag_regex is not None:
            words.append(f"tag_regex {self.tag_regex}")
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request may go to the upstream, and which rule said so."""

    allowed: bool
    rule: str  #: the deciding rule's key, or ``upstreams.<name>.rules_default``
    description: str  #: the rule in a few words

    def error(self, what: str) -> Denied:
        """The ``DENIED`` error for a refused ``what`` (``"library/alpine:latest"``)."""
        return Denied(f"{what} is not allowed from this upstream: denied by {self.rule} "
                      f"({self.description})")


#: Decisions remembered per rule set: a pull asks about the same repository for every blob.
_MEMO_SIZE = 4096


class RuleSet:
    """The rules of one upstream. :meth:`decide` is pure: one regex match per rule tried
    (about a microsecond each), remembered for the next request for the same name; an
    upstream without rules allows everything."""

    def __init__(self, key: str, rules: Sequence[Rule] = (), default: str = ALLOW) -> None:
        if default not in (ALLOW, DENY):
            raise ValueError(f"default must be {ALLOW!r} or {DENY!r}, got {default!r}")
        self.key = key
        self.rules = tuple(rules)
        self.default = default
        self._decisions = tuple(Decision(r.action == ALLOW, r.key, r.describe()) for r in self.rules)
        self._default = Decision(default == ALLOW, f"{key}.rules_default",
                                 f"rules_default = {default}, no rule matched")
        self._memo: dict[tuple[str, str | None], Decision] = {}

    def decide(self, repository: str, tag: str | None = None) -> Decision:
        """The decision for ``repository`` (its name on the upstream) by ``tag``, or by
        digest when ``tag`` is ``None``."""
        found = self._memo.get((repository, tag))
        if found is not None:
            return found
        found = self._evaluate(repository, None if tag is not None and is_attached_tag(tag) else tag)
        if len(self._memo) >= _MEMO_SIZE:  # bounded: a scan of many names does not pile up
            self._memo.clear()
        self._memo[(repository, tag)] = found
        return found

    def _evaluate(self, repository: str, tag: str | None) -> Decision:
        for rule, decision in zip(self.rules, self._decisions, strict=True):
            if rule.applies(repository, tag):
                return decision
        return self._default

    def __eq__(self, other: object) -> bool:
        """Equal when written alike: configurations compare by value."""
        if not isinstance(other, RuleSet):
            return NotImplemented
        return (self.key, self.rules, self.default) == (other.key, other.rules, other.default)

    def __hash__(self) -> int:
        return hash((self.key, self.rules, self.default))

    def __repr__(self) -> str:
        return f"RuleSet({self.key!r}, {len(self.rules)} rules, default={self.default!r})"


def _str_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"expected a non-empty list of strings, got {value!r}")
    return value


def _repository_pattern(key: str, value: str) -> str:
    if (len(value) > 255 or not _REPO_PATTERN.fullmatch(value)
            or any("**" in c and c != "**" for c in value.split("/"))):
        raise ConfigError(key, f"expected a repository pattern such as \"library/*\" or "
                               f"\"org/**\" (as named on the upstream), got {value!r}")
    return value


def _tag_glob(key: str, value: str) -> str:
    if not _TAG_GLOB.fullmatch(value):
        raise ConfigError(key, f"expected a tag or a tag glob such as \"v*\" (letters, digits, "
                               f"'.', '_', '-' and '*'), got {value!r}")
    return value


def _tag_regex(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a regular expression such as '\\d+\\.\\d+\\.\\d+', got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(key, f"not a valid regular expression ({exc}): {value!r}") from None
    return value


def parse_rule(key: str, raw: Any) -> Rule:
    """One ``rules`` entry; ``key`` is where it is written (``upstreams.<name>.rules[<i>]``)."""
    t = take_keys(raw, key, set(RULE_KEYS))
    if "action" not in t:
        raise ConfigError(f"{key}.action", "missing (action = \"allow\" or \"deny\")")
    action = t["action"]
    if action not in (ALLOW, DENY):
        raise ConfigError(f"{key}.action", f"expected \"allow\" or \"deny\", got {action!r}")
    repositories: tuple[str, ...] = ("**",)
    if "repositories" in t:
        k = f"{key}.repositories"
        repositories = tuple(_repository_pattern(k, p) for p in _str_list(k, t["repositories"]))
    tags: tuple[str, ...] = ()
    if "tags" in t:
        tags = tuple(_tag_glob(f"{key}.tags", g) for g in _str_list(f"{key}.tags", t["tags"]))
    regex = _tag_regex(f"{key}.tag_regex", t["tag_regex"]) if "tag_regex" in t else None
    name = t.get("name")
    if name is not None and (not isinstance(name, str) or not name or len(name) > 200):
        raise ConfigError(f"{key}.name", f"expected a short description, got {name!r}")
    return Rule(key=key, action=action, repositories=repositories, tags=tags, tag_regex=regex,
                name=name)


def parse_rules(key: str, rules: Any = None, default: Any = None) -> RuleSet:
    """An upstream's ``rules`` and ``rules_default`` (``None`` when absent); ``key`` is the
    upstream's table (``upstreams.docker.io``). Every error names the key at fault:
    ``upstreams.docker.io.rules[2].repositories: ...``."""
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        raise ConfigError(f"{key}.rules", "expected a list of tables such as "
                                          "[{ action = \"allow\", repositories = [\"library/*\"] }]")
    parsed = [parse_rule(f"{key}.rules[{i}]", r) for i, r in enumerate(rules)]
    if default is None:
        if parsed:
            raise ConfigError(f"{key}.rules_default", "required with rules: \"allow\" or \"deny\", "
                                                      "what a request that no rule matches gets")
        default = ALLOW
    if default not in (ALLOW, DENY):
        raise ConfigError(f"{key}.rules_default", f"expected \"allow\" or \"deny\", got {default!r}")
    return RuleSet(key, parsed, default)


def parse_repository_patterns(key: str, value: Any) -> tuple[str, ...]:
    """A non-empty list of repository patterns, checked as ``rules`` checks theirs (for other
    per-repository settings, compiled with :func:`compile_repository_patterns`)."""
    return tuple(_repository_pattern(key, v) for v in _str_list(key, value))
