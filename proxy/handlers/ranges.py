"""HTTP ``Range`` for blob GETs: one byte range, as registries and containerd use it."""

from __future__ import annotations

import re

from proxy.errors import RangeNotSatisfiable

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` for a satisfiable single range, ``None`` for no range.

    Multiple ranges and malformed or unsatisfiable ones raise 416 (what aiohttp's file
    responses do too, so cached and filling blobs answer alike).
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
        n = int(last)
        if n == 0 or size == 0:
            raise bad
        return max(size - n, 0), size
    start = int(first)
    end = int(last) + 1 if last else size
    if start >= size or end <= start:
        raise bad
    return start, min(end, size)
