"""Parsing ``WWW-Authenticate`` challenges (RFC 7235) as registries send them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PARAM = re.compile(r'\s*([a-zA-Z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    """One challenge: a scheme (lower-cased) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a header such as ``Bearer realm="https://auth",service="reg",scope="a,b"``."""
    challenges: list[Challenge] = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        m = re.match(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*", text[pos:])
        if not m:
            break
        scheme = m.group(1).lower()
        pos += m.end()
        params: dict[str, str] = {}
        while pos < len(text):
            pm = _PARAM.match(text, pos)
            if not pm:
                break
            # a bare token followed by a space starts the next challenge
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value or "")
            pos = pm.end()
        challenges.append(Challenge(scheme, params))
        if pos < len(text) and text[pos] == ",":
            pos += 1
    return challenges
