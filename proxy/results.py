"""What a read of a repository answers, whichever service (pull-through or hosted) made it.

Both services return these types and the HTTP layer consumes them, so they live below
both: neither service imports the other for them. A blob is one of three shapes, each
carrying only what it has, so a handler matches on the type instead of checking which
fields happen to be set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol

from proxy.reference import Digest


class CacheOutcome(StrEnum):
    """How a request was answered: the ``cache=`` field of the access log and the
    ``outcome`` label of the metrics (the values are what both have always shown)."""

    HIT = "hit"  #: from the store
    MISS = "miss"  #: fetched from the upstream for this request
    COALESCED = "coalesced"  #: joined another request's upstream fetch
    STALE = "stale"  #: the last known tag, because the upstream could not answer
    REVALIDATED = "revalidated"  #: an expired tag the upstream confirmed
    REFRESHING = "refreshing"  #: a just-expired tag, answered while revalidated in the background
    HOSTED = "hosted"  #: a hosted repository's read: from the store, but no cache read
    PEER = "peer"  #: another replica streaming a fill of this one
    NOT_FOUND = "not_found"  #: a name that exists nowhere (no cache read either)
    ERROR = "error"  #: this proxy failed to serve it (a full disk, say)
    UPSTREAM_ERROR = "upstream_error"  #: the upstream failed mid-transfer
    NONE = "-"  #: refused before any read (a bad name, no credentials)


#: The outcomes every request reads, as plain module globals: looking up an enum member
#: costs ~0.1 µs on Python 3.11, a noticeable share of a cached manifest's CPU.
HIT = CacheOutcome.HIT
NO_OUTCOME = CacheOutcome.NONE


class Manifest(Protocol):
    """A manifest's exact bytes and the media type they were served with (a stored one)."""

    @property
    def digest(self) -> Digest: ...
    @property
    def media_type(self) -> str: ...
    @property
    def data(self) -> bytes: ...


@dataclass(slots=True)
class ManifestResult:
    """A manifest to answer with; ``data`` is ``None`` for a HEAD answered from upstream."""

    digest: Digest
    media_type: str
    size: int
    data: bytes | None
    outcome: CacheOutcome

    @classmethod
    def of(cls, item: Manifest, outcome: CacheOutcome) -> ManifestResult:
        """A stored manifest, answered with its body."""
        return cls(item.digest, item.media_type, len(item.data), item.data, outcome)


class LocalSpan(NamedTuple):
    """Bytes ``[offset, offset + length)`` of an open file, ready to be sent as they are
    (``sendfile``) or read."""

    fd: int
    offset: int
    length: int


#: ``source(start, end)``: the spans of bytes ``[start, end)`` of a local file, as they may
#: be sent; bytes not (yet) in the file come as ``bytes`` (a cold range from the upstream).
SpanSource = Callable[[int, int | None], AsyncIterator[LocalSpan | bytes]]


class BlobReader(Protocol):
    """A client's view of a blob still arriving, as the HTTP layer takes it: its bytes, and
    for readers of a local file their spans, to be sent without a copy (``sendfile``). The
    client must close it."""

    @property
    def local_spans(self) -> SpanSource | None:
        """The spans of the file being read; ``None`` when there is no local file."""
        ...

    def stream(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob in the store: served from there (a file, a stream or a redirect)."""

    digest: Digest
    size: int
    outcome: CacheOutcome


@dataclass(frozen=True, slots=True)
class FillingBlob:
    """A blob still being filled: its bytes come from ``reader`` as they arrive (``size``
    is ``None`` when the upstream did not announce it)."""

    digest: Digest
    size: int | None
    reader: BlobReader
    outcome: CacheOutcome


@dataclass(frozen=True, slots=True)
class UpstreamHead:
    """A HEAD answered without the bytes: the size the upstream (or a running fill)
    announced."""

    digest: Digest
    size: int
    outcome: CacheOutcome


BlobResult = StoredBlob | FillingBlob | UpstreamHead


def paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The spec's ``n``/``last`` pagination over a sorted list: ``(page, more)``."""
    if last is not None:
        items = [i for i in items if i > last]
    if n is None:
        return items, False
    return items[:n], len(items) > n
