"""Referrers of cached repositories (``GET /v2/<name>/referrers/<digest>``, OCI 1.1).

The upstream's referrers API is asked (``Endpoint.REFERRERS``); where it has none (a 404,
as distribution 2.8 answers) the referrers tag schema's ``sha256-<hex>`` tag is read
instead, as a tag of the repository (so with the tags' TTL and stale-on-outage). Either
list only names candidates: each referring manifest is pulled through like any other
content (verified by digest, stored, linked to the repository) and listed with the
descriptor of its own bytes, only if its ``subject`` really is the digest. The answer is
recorded as the store's referrers of the subject, and trusted for ``ttl`` (this process's
memory, then the shared tag cache); when the upstream cannot answer, the last answer is
served (this process's memory, else the store's record), stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.bounded import BoundedDict
from proxy.errors import (
    BadGateway,
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
    Unavailable,
)
from proxy.mediatypes import OCI_INDEX
from proxy.policy.referrers import (
    parse_referrers_index,
    referrer_descriptor,
    referrers_index,
    referrers_tag,
)
from proxy.reference import Digest
from proxy.results import ManifestResult
from proxy.routing import Route
from proxy.sharedcache import SharedCache
from proxy.singleflight import SingleFlight
from proxy.storage import Store
from proxy.storage.referrers import stored_referrers
from proxy.upstream import Endpoint, read_capped, upstream_error

log = logging.getLogger("regproxy.pullthrough")

#: Referrers pulled through per subject: each costs a manifest fetch; the rest are left out.
MAX_PULLED = 128
#: The largest referrers list read from an upstream.
MAX_LIST_BYTES = 4 << 20

#: Pulls a manifest of the route's repository through by digest, or a tag (verified,
#: stored, linked): the pull-through service's own paths.
DigestPuller = Callable[[Route, Digest], Awaitable[ManifestResult]]
TagPuller = Callable[[Route, str], Awaitable[ManifestResult]]
#: What the upstream may fail with and still leave the last answer standing.
OUTAGES = (Unavailable, TooManyRequests, BadGateway)


def referrers_key(route: Route, subject: Digest) -> str:
    """The key of a subject's referrers list in memory and in the shared cache (``@`` is in
    no repository name or tag, so it is no tag's key)."""
    return f"referrers@{route.key}@{subject}"


class Referrers:
    """The referrers lists of cached repositories, fresh for ``ttl``."""

    def __init__(self, store: Store, shared: SharedCache, *, ttl: float,
                 pull_digest: DigestPuller, pull_tag: TagPuller) -> None:
        self._store = store
        self._shared = shared
        self.ttl = ttl
        self._pull_digest = pull_digest
        self._pull_tag = pull_tag
        #: key -> (entries, until when, monotonic); kept past expiry for outages
        self._l1: BoundedDict[str, tuple[list[dict[str, Any]], float]] = BoundedDict(10_000)
        self._flight: SingleFlight[list[dict[str, Any]]] = SingleFlight()

    async def get(self, route: Route, subject: Digest) -> list[dict[str, Any]]:
        """The descriptors of ``subject``'s referrers (unfiltered)."""
        key = referrers_key(route, subject)
        now = time.monotonic()
        entry = self._l1.get(key)
        if entry is not None and entry[1] > now:
            return entry[0]
        if self.ttl > 0:
            cached = await self._shared.get(key)  # (a sibling or replica fetched it)
            parsed = None if cached is None else parse_referrers_index(cached.encode())
            if parsed is not None:
                self._l1[key] = (parsed, now + min(self.ttl, 1.0))
                return parsed
        try:
            entries, _ = await self._flight.do(key, lambda: self._fetch(route, subject, key))
        except OUTAGES as exc:
            stale = entry[0] if entry is not None else None
            if stale is None and await self._store.list_referrers(route.key, subject):
                stale = await stored_referrers(self._store, route.key, subject)
            if stale is None:
                raise
            log.warning("serving stale referrers of %s@%s because upstream %s failed: %s",
                        route.name, subject, route.upstream_client.name, exc.message)
            return stale
        return entries

    def forget(self) -> None:
        """Drop this process's lists (the store was purged behind its back)."""
        self._l1.clear()

    def running(self) -> list[Any]:
        """Fetches in flight (cancelled at shutdown)."""
        return self._flight.running()

    async def _fetch(self, route: Route, subject: Digest, key: str) -> list[dict[str, Any]]:
        candidates = await self._upstream_list(route, subject)
        entries: list[dict[str, Any]] = []
        for digest in dict.fromkeys(candidates):
            if len(entries) == MAX_PULLED:
                log.warning("referrers of %s@%s: only the first %d are listed", route.name,
                            subject, MAX_PULLED)
                break
            try:
                item = await self._pull_digest(route, digest)
            except (ManifestUnknown, BadGateway) as exc:  # listed, but not served (or not verified)
                log.info("referrer %s of %s@%s left out: %s", digest, route.name, subject,
                         exc.message)
                continue
            described = (None if item.data is None
                         else referrer_descriptor(item.digest, item.media_type, item.data, subject))
            if described is None:
                log.info("referrer %s of %s@%s left out: its subject is not %s", digest,
                         route.name, subject, subject)
                continue
            entries.append(described)
        await self._record(route, subject, {Digest.parse(e["digest"]) for e in entries})
        if self.ttl > 0:  # (a ttl of 0: always ask)
            self._l1[key] = (entries, time.monotonic() + self.ttl)
            await self._shared.set(key, referrers_index(entries).decode(), ttl=self.ttl)
        return entries

    async def _upstream_list(self, route: Route, subject: Digest) -> list[Digest]:
        """The digests the upstream lists as referring to ``subject``: its referrers API,
        else (404) its referrers schema tag."""
        upstream = route.upstream_client
        async with upstream.request("GET", route.remote, Endpoint.REFERRERS, subject,
                                    headers={"Accept": OCI_INDEX}) as resp:
            if resp.status == 200:
                data: bytes | None = await read_capped(resp, MAX_LIST_BYTES)
            elif resp.status == 404:
                data = None
            else:
                raise upstream_error(resp, upstream, f"referrers of {route.remote}@{subject}",
                                     NameUnknown)
        if data is None:
            data = await self._schema_tag(route, subject)
        listed = parse_referrers_index(data) if data is not None else None
        return [Digest.parse(e["digest"]) for e in listed or []]

    async def _schema_tag(self, route: Route, subject: Digest) -> bytes | None:
        """The image index of the ``sha256-<hex>`` tag, pulled through; ``None`` without one."""
        try:
            result = await self._pull_tag(route, referrers_tag(subject))
        except (ManifestUnknown, NameUnknown):
            return None
        return result.data

    async def _record(self, route: Route, subject: Digest, digests: set[Digest]) -> None:
        """Make the store's referrers of ``subject`` the ones just listed (the outage copy)."""
        recorded = set(await self._store.list_referrers(route.key, subject))
        for digest in digests - recorded:
            await self._store.add_referrer(route.key, subject, digest)
        for digest in recorded - digests:
            await self._store.remove_referrer(route.key, subject, digest)
