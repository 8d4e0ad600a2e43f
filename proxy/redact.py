"""URLs made safe to show: the status page, logs and error messages print configured URLs,
and a password (userinfo) or a token (query) in one must never reach them."""

from __future__ import annotations

from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """``url`` without userinfo, query and fragment (``https://u:pw@h/p?t=x`` -> ``https://h/p``)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return "<unparseable URL>"
    host = parts.netloc.rpartition("@")[2]
    if not parts.scheme or not host:
        return "<URL>" if any(c in url for c in "@?#") else url
    return f"{parts.scheme}://{host}{parts.path}"


__all__ = ["redact_url"]
