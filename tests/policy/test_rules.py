"""Allow/deny rules per upstream (proxy/policy/rules.py): the pattern language, first-match
semantics, pulls by digest and attached tags, and the config parser's error keys."""

from __future__ import annotations

import fnmatch
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError
from proxy.errors import Denied
from proxy.policy.rules import ALLOW, DENY, Rule, RuleSet, compile_repository_patterns, parse_rules

KEY = "upstreams.docker.io"
SEMVER = r"v?\d+(\.\d+){0,2}(-[a-z0-9.]+)?"


def rules_from_toml(text: str) -> RuleSet:
    """The rules of ``[upstreams."docker.io"]`` as an operator would write them."""
    up = tomllib.loads(text)["upstreams"]["docker.io"]
    return parse_rules(KEY, up.get("rules"), up.get("rules_default"))


# --- the repository pattern language ------------------------------------------------------

@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("library/alpine", "library/alpine", True),
    ("library/alpine", "library/alpine2", False),
    ("library/*", "library/alpine", True),
    ("library/*", "library/a/b", False),          # * stays within one component
    ("library/*", "library", False),
    ("library/*", "other/alpine", False),
    ("*/alpine", "library/alpine", True),
    ("*/alpine", "x/y/alpine", False),
    ("org/**", "org/a", True),
    ("org/**", "org/a/b/c", True),
    ("org/**", "org", False),                     # ** is one or more components
    ("org/**", "organisation/a", False),
    ("**", "alpine", True),
    ("**", "a/b/c", True),
    ("**/nginx", "library/nginx", True),
    ("**/nginx", "a/b/nginx", True),
    ("**/nginx", "nginx", False),
    ("**/nginx", "library/nginx-extra", False),
    ("a/**/z", "a/b/z", True),
    ("a/**/z", "a/b/c/z", True),
    ("a/**/z", "a/z", False),
    ("team-*/app", "team-red/app", True),
    ("team-*/app", "team/app", False),
    ("*-prod/*", "x-prod/y", True),
    ("lib.rary/x", "libXrary/x", False),          # a dot is a dot, not any character
    ("a*b", "ab", True),
    ("a*b", "a-x-b", True),
])
def test_repository_patterns(pattern, name, matches):
    assert (compile_repository_patterns([pattern]).fullmatch(name) is not None) is matches


def test_several_patterns_in_one_rule():
    rx = compile_repository_patterns(["library/*", "bitnami/**", "exact/name"])
    assert [n for n in ("library/x", "bitnami/a/b", "exact/name", "exact/name2", "other/x")
            if rx.fullmatch(n)] == ["library/x", "bitnami/a/b", "exact/name"]


def _reference_match(pattern: list[str], name: list[str]) -> bool:
    """The pattern language by its definition, component by component (an independent
    implementation: ``fnmatch`` for one component, recursion for ``**``)."""
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_reference_match(rest, name[k:]) for k in range(1, len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _reference_match(rest, name[1:])


_COMPONENTS = st.sampled_from(["a", "b", "ab", "a-b", "a.b"])
_PATTERN_COMPONENTS = st.sampled_from(["a", "b", "ab", "*", "**", "a*", "*b", "a-*", "*.b"])


@given(st.lists(_PATTERN_COMPONENTS, min_size=1, max_size=5), st.lists(_COMPONENTS, min_size=1, max_size=6))
def test_compiled_patterns_agree_with_the_definition(pattern, name):
    compiled = compile_repository_patterns(["/".join(pattern)])
    assert (compiled.fullmatch("/".join(name)) is not None) is _reference_match(pattern, name)


# --- first match wins -------------------------------------------------------------------------

def allowlist() -> RuleSet:
    return rules_from_toml(f"""
[upstreams."docker.io"]
rules_default = "deny"
rules = [
  {{ action = "deny",  tags = ["latest"], name = "no floating tags" }},
  {{ action = "allow", repositories = ["library/*"], tag_regex = '{SEMVER}' }},
  {{ action = "allow", repositories = ["bitnami/**"] }},
  {{ action = "deny",  repositories = ["bitnami/**"], tags = ["*-debug"] }},
]
""")


@pytest.mark.parametrize(("repository", "tag", "allowed", "rule"), [
    ("library/alpine", "3.19", True, f"{KEY}.rules[1]"),
    ("library/alpine", "v1.2.3-rc1", True, f"{KEY}.rules[1]"),
    ("library/alpine", "latest", False, f"{KEY}.rules[0]"),       # the first rule wins
    ("library/alpine", "edge", False, f"{KEY}.rules_default"),    # no rule matched
    ("library/alpine", "3.19-extra!", False, f"{KEY}.rules_default"),
    ("bitnami/redis", "7.2-debug", True, f"{KEY}.rules[2]"),      # rules[3] comes too late
    ("bitnami/redis", "latest", False, f"{KEY}.rules[0]"),
    ("bitnami/charts/redis", "1", True, f"{KEY}.rules[2]"),
    ("someone/app", "1.0", False, f"{KEY}.rules_default"),
])
def test_first_matching_rule_decides(repository, tag, allowed, rule):
    decision = allowlist().decide(repository, tag)
    assert (decision.allowed, decision.rule) == (allowed, rule)


def test_order_matters_deny_before_allow():
    deny_first = parse_rules(KEY, [{"action": "deny", "repositories": ["library/busybox"]},
                                   {"action": "allow", "repositories": ["library/*"]}], "deny")
    allow_first = parse_rules(KEY, [{"action": "allow", "repositories": ["library/*"]},
                                    {"action": "deny", "repositories": ["library/busybox"]}], "deny")
    assert not deny_first.decide("library/busybox", "1").allowed
    assert allow_first.decide("library/busybox", "1").allowed  # the deny rule is never reached


def test_denylist_with_default_allow():
    rules = parse_rules(KEY, [{"action": "deny", "repositories": ["evil/**"]},
                              {"action": "deny", "tags": ["latest", "*-nightly"]}], "allow")
    assert not rules.decide("evil/miner", "1").allowed
    assert not rules.decide("library/alpine", "latest").allowed
    assert not rules.decide("library/alpine", "2024-01-01-nightly").allowed
    d = rules.decide("library/alpine", "3.19")
    assert d.allowed and d.rule == f"{KEY}.rules_default"


def test_regex_is_anchored_and_keeps_inline_flags():
    rules = parse_rules(KEY, [{"action": "allow", "tag_regex": r"\d+"},
                              {"action": "allow", "tags": ["x*"], "tag_regex": r"(?i)rc\d"}], "deny")
    assert rules.decide("a", "123").allowed
    assert not rules.decide("a", "123a").allowed        # fullmatch, not search
    assert not rules.decide("a", "a123").allowed
    assert rules.decide("a", "RC1").rule == f"{KEY}.rules[1]"   # (?i) applies to the regex
    assert rules.decide("a", "xyz").allowed                      # either condition is enough
    assert not rules.decide("a", "Xyz").allowed                  # globs are case-sensitive


def test_tag_globs():
    rules = parse_rules(KEY, [{"action": "allow", "tags": ["v*", "*-alpine", "exact"]}], "deny")
    allowed = [t for t in ("v1", "v", "1.0-alpine", "exact", "exactly", "1.0", "alpine")
               if rules.decide("x", t).allowed]
    assert allowed == ["v1", "v", "1.0-alpine", "exact"]


# --- pulls by digest and attached tags ----------------------------------------------------------

def test_digest_pulls_follow_the_repository():
    rules = allowlist()
    # an allow rule with a tag condition covers the repository's content by digest
    d = rules.decide("library/alpine", None)
    assert d.allowed and d.rule == f"{KEY}.rules[1]"
    # a deny rule with a tag condition ("no latest") does not apply to a digest
    assert rules.decide("bitnami/redis", None).rule == f"{KEY}.rules[2]"
    # a repository no rule allows stays denied by digest too
    assert not rules.decide("someone/app", None).allowed


def test_repository_wide_deny_applies_to_digests():
    rules = parse_rules(KEY, [{"action": "deny", "repositories": ["library/busybox"]}], "allow")
    assert not rules.decide("library/busybox", None).allowed
    assert rules.decide("library/alpine", None).allowed


@pytest.mark.parametrize("tag", ["sha256-" + "ab" * 32, "sha256-" + "ab" * 32 + ".sig",
                                 "sha256-" + "ab" * 32 + ".att", "sha256-" + "ab" * 32 + ".sbom"])
def test_attached_tags_are_decided_like_digests(tag):
    """A semver-only rule must not hide an allowed image's signatures and referrers."""
    rules = allowlist()
    d = rules.decide("library/alpine", tag)
    assert d.allowed and d.rule == f"{KEY}.rules[1]"
    assert not rules.decide("someone/app", tag).allowed


def test_near_attached_tags_are_ordinary_tags():
    rules = allowlist()
    for tag in ("sha256-" + "ab" * 31, "sha256-" + "AB" * 32, "sha256-" + "ab" * 32 + ".tar",
                "sha512-" + "ab" * 32):
        assert rules.decide("library/alpine", tag).rule == f"{KEY}.rules_default", tag


# --- no rules, defaults, messages -------------------------------------------------------------

def test_no_rules_allow_everything():
    rules = parse_rules(KEY)
    d = rules.decide("anything/at/all", "latest")
    assert d.allowed and d.rule == f"{KEY}.rules_default"
    assert rules.decide("x", None).allowed


def test_default_alone_closes_an_upstream():
    rules = parse_rules(KEY, None, "deny")
    assert not rules.decide("library/alpine", "3.19").allowed


def test_denied_error_names_the_rule():
    err = allowlist().decide("library/alpine", "latest").error("library/alpine:latest")
    assert isinstance(err, Denied) and err.status == 403 and err.code == "DENIED"
    assert err.message == ("library/alpine:latest is not allowed from this upstream: denied by "
                           "upstreams.docker.io.rules[0] (no floating tags)")
    err = allowlist().decide("someone/app", "1").error("someone/app:1")
    assert "upstreams.docker.io.rules_default (rules_default = deny, no rule matched)" in err.message


def test_describe_without_a_name():
    rule = Rule(key="k", action=DENY, repositories=("a/*", "b/**"), tags=("latest",), tag_regex="x.*")
    assert rule.describe() == "deny a/* b/** tags latest tag_regex x.*"
    assert Rule(key="k", action=ALLOW).describe() == "allow **"


def test_decisions_are_shared_not_rebuilt():
    rules = allowlist()
    assert rules.decide("library/alpine", "1") is rules.decide("library/nginx", "2")


# --- the parser: one line, naming the key -----------------------------------------------------

@pytest.mark.parametrize(("rules", "default", "key", "problem"), [
    ("nope", "deny", f"{KEY}.rules", "expected a list of tables"),
    (["x"], "deny", f"{KEY}.rules[0]", "expected a table"),
    ([{"repositories": ["a/*"]}], "deny", f"{KEY}.rules[0].action", "missing"),
    ([{"action": "permit"}], "deny", f"{KEY}.rules[0].action", "expected \"allow\" or \"deny\""),
    ([{"action": "allow"}, {"action": "deny", "repository": ["x"]}], "deny", f"{KEY}.rules[1].repository",
     "unknown key"),
    ([{"action": "allow", "repositories": "library/*"}], "deny", f"{KEY}.rules[0].repositories",
     "expected a non-empty list of strings"),
    ([{"action": "allow", "repositories": []}], "deny", f"{KEY}.rules[0].repositories", "non-empty"),
    ([{"action": "allow"}, {"action": "allow"},
      {"action": "allow", "repositories": ["Library/*"]}], "deny", f"{KEY}.rules[2].repositories",
     "expected a repository pattern"),
    ([{"action": "allow", "repositories": ["a/**b"]}], "deny", f"{KEY}.rules[0].repositories",
     "expected a repository pattern"),
    ([{"action": "allow", "repositories": ["/a"]}], "deny", f"{KEY}.rules[0].repositories", "pattern"),
    ([{"action": "allow", "repositories": ["a//b"]}], "deny", f"{KEY}.rules[0].repositories", "pattern"),
    ([{"action": "allow", "repositories": ["ghcr.io:443/x"]}], "deny", f"{KEY}.rules[0].repositories",
     "as named on the upstream"),
    ([{"action": "allow", "tags": ["v1/x"]}], "deny", f"{KEY}.rules[0].tags", "tag glob"),
    ([{"action": "allow", "tags": ["v?"]}], "deny", f"{KEY}.rules[0].tags", "tag glob"),
    ([{"action": "allow", "tags": []}], "deny", f"{KEY}.rules[0].tags", "non-empty"),
    ([{"action": "allow", "tag_regex": "v(1"}], "deny", f"{KEY}.rules[0].tag_regex",
     "not a valid regular expression"),
    ([{"action": "allow", "tag_regex": ""}], "deny", f"{KEY}.rules[0].tag_regex", "expected a regular"),
    ([{"action": "allow", "tag_regex": ["a"]}], "deny", f"{KEY}.rules[0].tag_regex", "expected a regular"),
    ([{"action": "allow", "name": 3}], "deny", f"{KEY}.rules[0].name", "short description"),
    ([{"action": "allow"}], None, f"{KEY}.rules_default", "required with rules"),
    ([], "maybe", f"{KEY}.rules_default", "expected \"allow\" or \"deny\""),
])
def test_parser_errors_name_the_key(rules, default, key, problem):
    with pytest.raises(ConfigError) as info:
        parse_rules(KEY, rules, default)
    assert info.value.key == key
    assert problem in info.value.problem
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


def test_parser_keeps_what_was_written():
    rules = allowlist()
    assert rules.default == DENY and len(rules.rules) == 4
    first, second = rules.rules[0], rules.rules[1]
    assert (first.key, first.action, first.repositories, first.tags, first.name) == (
        f"{KEY}.rules[0]", DENY, ("**",), ("latest",), "no floating tags")
    assert (second.repositories, second.tag_regex) == (("library/*",), SEMVER)
    assert repr(rules) == "RuleSet('upstreams.docker.io', 4 rules, default='deny')"


def test_ruleset_refuses_an_unknown_default():
    with pytest.raises(ValueError):
        RuleSet(KEY, (), "maybe")


# --- properties of first-match ------------------------------------------------------------------

_RULES = st.lists(st.fixed_dictionaries(
    {"action": st.sampled_from([ALLOW, DENY])},
    optional={"repositories": st.lists(st.sampled_from(["a/*", "a/**", "**", "b/c", "*/c"]),
                                       min_size=1, max_size=2),
              "tags": st.lists(st.sampled_from(["v*", "latest", "1.*"]), min_size=1, max_size=2)}),
    max_size=6)
_REQUESTS = st.tuples(st.sampled_from(["a/b", "a/b/c", "b/c", "x"]),
                      st.sampled_from([None, "v1", "latest", "1.2", "edge"]))


@given(_RULES, st.sampled_from([ALLOW, DENY]), _REQUESTS)
def test_the_first_applying_rule_decides(raw, default, req):
    rules = parse_rules(KEY, raw, default)
    repository, tag = req
    decision = rules.decide(repository, tag)
    applying = [r for r in rules.rules if r.applies(repository, tag)]
    if applying:
        assert decision.rule == applying[0].key
        assert decision.allowed is (applying[0].action == ALLOW)
    else:
        assert decision.rule == f"{KEY}.rules_default"
        assert decision.allowed is (default == ALLOW)
    # a rule added at the end decides only what no earlier rule did
    tail = parse_rules(KEY, [*raw, {"action": ALLOW if default == DENY else DENY}], default)
    assert tail.decide(repository, tag).allowed is (decision.allowed if applying
                                                     else default != ALLOW)


def test_remembered_decisions_stay_bounded_and_right():
    rules = allowlist()
    for i in range(5000):
        assert rules.decide(f"library/app{i}", "latest").rule == f"{KEY}.rules[0]"
    assert len(rules._memo) <= 4096
    assert rules.decide("library/app1", "1.0").rule == f"{KEY}.rules[1]"
    assert rules.decide("library/app1", "sha256-" + "ab" * 32 + ".sig").allowed
    assert not rules.decide("library/app1", "latest").allowed
