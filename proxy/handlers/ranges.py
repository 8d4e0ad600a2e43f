"""HTTP ``Range`` for blob GETs: one byte range, as registries and containerd use it."""

from __future__ import annotations

import re

from proxy.errors import RangeNotSatisfiable
from proxy.untrusted import parse_digits

#: ASCII digits only (``\d`` matches other scripts' digits too); lengths checked below.
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` for a satisfiable single range, ``None`` for no range.

    Multiple ranges and malformed or unsatisfiable ones raise 416 (what aiohttp's file
    responses do too, so cached and filling blobs answer alike); so do numbers too long
    to be an offset.
    """
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip().replace(" ", ""))
    bad = RangeNotSatisfiable(f"range {header[:100]!r} not satisfiable for {size} bytes",
                              headers={"Content-Range": f"bytes */{size}"})
    if m is None:
        raise bad
    first, last = m.groups()
    if not first and not last:
        raise bad
    if not first:  # suffix range: the last N bytes
        n = parse_digits(last)
        if not n or size == 0:
            raise bad
        return max(size - n, 0), size
    start = parse_digits(first)
    end = (parse_digits(last) if last else size - 1)
    if start is None or end is None or start >= size or end < start:
        raise bad
    return start, min(end + 1, size)
