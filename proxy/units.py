"""Sizes and rates for people: one set of binary units (B, KiB, MiB, GiB, TiB) for every
figure the commands print, bars and summaries alike."""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_size(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``; bytes below 1 KiB as they are (``"512 B"``)."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_rate(n: int | float, seconds: float) -> str:
    """Bytes over seconds as ``"12.3 MiB/s"`` (always MiB/s, so runs compare at a glance)."""
    rate = n / seconds / (1 << 20) if seconds > 0 else 0.0
    return f"{rate:.1f} MiB/s"
