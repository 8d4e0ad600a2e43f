"""Parsing text that comes from clients: numbers and JSON, failing only in ways a handler
turns into a 4xx.

``str.isdigit`` and ``int`` accept ``²`` and other scripts' digits, ``int`` refuses more
than 4,300 digits with a ``ValueError`` nobody expected, and ``json.loads`` raises
``RecursionError`` on deep nesting: each of these was a 500 with a traceback.
"""

from __future__ import annotations

import json
from typing import Any

#: Enough for any size, offset or count (below 2**63); longer is malformed, not large.
MAX_DIGITS = 19


def parse_digits(text: str, max_digits: int = MAX_DIGITS) -> int | None:
    """The value of ``text`` when it is 1 to ``max_digits`` ASCII digits, else ``None``."""
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def loads_json(data: bytes | str) -> Any:
    """``json.loads`` whose every failure is a ``ValueError`` (too deep included)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
