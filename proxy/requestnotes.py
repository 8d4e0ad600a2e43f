"""What the access log learns about a request from the layers below its handler.

The upstream client does not know which client request it serves (single flight, fills
that outlive their first client), so it notes its answers in the notes of the current
context: the connection's request factory gives each request fresh notes when the access
log is on (:func:`begin`), tasks started for the request inherit them, and the access line
reads them. With the access log off there are no notes and :func:`note_upstream` is one
context-variable lookup per upstream request.
"""

from __future__ import annotations

from contextvars import ContextVar


class UpstreamNotes:
    """The last upstream status, the time spent waiting for upstream answers, and what
    went wrong upstream, for one client request."""

    __slots__ = ("error", "ms", "status")

    def __init__(self) -> None:
        self.status: int | None = None
        self.ms: float | None = None
        self.error: str | None = None


_CURRENT: ContextVar[UpstreamNotes | None] = ContextVar("regproxy_upstream_notes", default=None)


def begin() -> UpstreamNotes:
    """Fresh notes for the request about to be handled in this context."""
    notes = UpstreamNotes()
    _CURRENT.set(notes)
    return notes


def note_upstream(status: int | None, seconds: float, error: str | None = None) -> None:
    """Record an upstream answer (``status``), or a failure (``error``), and its latency."""
    notes = _CURRENT.get()
    if notes is None:
        return
    notes.ms = (notes.ms or 0.0) + seconds * 1000
    if status is not None:
        notes.status = status
    if error is not None:
        notes.error = error
