"""The signature policy on pull (an upstream's ``require_signature``): a manifest of a
matching repository is served, by tag or digest, GET or HEAD, only once its digest is
verified signed (:mod:`proxy.policy.signatures` says exactly what that checks).

The cosign signature, the subject's ``sha256-<hex>.sig`` tag, and its payload blob are
pulled through the proxy like any other content (cached, repository-scoped, verified by
digest). The verdict is kept per repository and digest (bounded): a signature once
verified holds for the digest (manifests by digest are immutable); a refusal is kept only
for the tag TTL, so an image signed later is served after it. A verified index vouches for
the manifests it names (their digests are in the signed bytes), so the platform manifests
of a signed multi-platform image pull too. An upstream that cannot be asked (an outage)
is answered as an outage, never as "unsigned".

Exempt: the cosign and referrers schema tags themselves (``sha256-<hex>[.sig|.att|.sbom]``),
which are how a signature is found.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proxy.bounded import BoundedDict
from proxy.errors import BadGateway, ManifestUnknown, NameUnknown, TagInvalid
from proxy.mediatypes import INDEXES, references
from proxy.policy.referrers import cosign_tag, is_attached_tag
from proxy.policy.signatures import MAX_PAYLOAD, Verdict, unsigned, verify_signature_manifest
from proxy.reference import Digest
from proxy.results import BlobResult, FillingBlob, ManifestResult, StoredBlob
from proxy.routing import Route
from proxy.singleflight import SingleFlight
from proxy.storage import Store
from proxy.untrusted import loads_json

#: Pulls a manifest of the route's repository through by tag, or a blob by digest.
TagPuller = Callable[[Route, str], Awaitable[ManifestResult]]
BlobPuller = Callable[[Route, Digest], Awaitable[BlobResult]]
#: Verdicts kept (repository and digest each).
MAX_VERDICTS = 50_000


class Signatures:
    """Checks pulls against the upstreams' ``require_signature`` policies."""

    def __init__(self, store: Store, *, refusal_ttl: float, pull_tag: TagPuller,
                 pull_blob: BlobPuller) -> None:
        self._store = store
        self.refusal_ttl = refusal_ttl
        self._pull_tag = pull_tag
        self._pull_blob = pull_blob
        #: (repository key, digest) -> (verdict, until when, monotonic)
        self._verdicts: BoundedDict[tuple[str, str], tuple[Verdict, float]] = BoundedDict(MAX_VERDICTS)
        self._flight: SingleFlight[Verdict] = SingleFlight()

    def running(self) -> list[asyncio.Future[Any]]:
        """Verifications in flight (cancelled at shutdown)."""
        return list(self._flight.running())

    async def check(self, route: Route, reference: str | Digest, result: ManifestResult) -> None:
        """Raise ``DENIED`` with the reason unless ``result`` (what ``reference`` named) may
        be served under the upstream's signature policy."""
        policy = route.upstream_client.config.require_signature
        if policy is None or not policy.applies(route.remote):
            return
        if isinstance(reference, str) and is_attached_tag(reference):
            return
        key = (route.key, str(result.digest))
        entry = self._verdicts.get(key)
        if entry is None or entry[1] <= time.monotonic():
            verdict, _ = await self._flight.do(key, lambda: self._verify(route, result.digest))
            if verdict.verified:
                self._verdicts[key] = (verdict, float("inf"))
                self._vouch_for_children(route, result, verdict)
            elif self.refusal_ttl > 0:
                self._verdicts[key] = (verdict, time.monotonic() + self.refusal_ttl)
        else:
            verdict = entry[0]
        if not verdict.verified:
            raise verdict.error(f"{route.name}@{result.digest}")

    async def _verify(self, route: Route, digest: Digest) -> Verdict:
        try:
            tag = cosign_tag(digest)
        except TagInvalid:
            return unsigned(digest)
        try:
            signature = await self._pull_tag(route, tag)
        except (ManifestUnknown, NameUnknown):
            return unsigned(digest)
        if signature.data is None:  # (a GET always has the body)
            raise BadGateway(f"no body for the signature manifest of {digest}")
        keys = route.upstream_client.config.require_signature
        assert keys is not None

        async def fetch_blob(payload: Digest) -> bytes:
            return await self._read(await self._pull_blob(route, payload))

        return await verify_signature_manifest(signature.data, digest, keys.keys, fetch_blob)

    async def _read(self, blob: BlobResult) -> bytes:
        """A small blob's bytes (a payload: at most ``MAX_PAYLOAD``, checked by the caller's
        size bound before the fetch; this bound stops a lying upstream)."""
        chunks: AsyncIterator[bytes]
        if isinstance(blob, StoredBlob):
            chunks = self._store.open_blob(blob.digest)
        elif isinstance(blob, FillingBlob):
            chunks = blob.reader.stream()
        else:
            raise BadGateway(f"no body for payload {blob.digest}")
        data = bytearray()
        try:
            async for chunk in chunks:
                data += chunk
                if len(data) > MAX_PAYLOAD:
                    break
        finally:
            if isinstance(blob, FillingBlob):
                blob.reader.close()
        return bytes(data)

    def _vouch_for_children(self, route: Route, result: ManifestResult, verdict: Verdict
                            ) -> None:
        """A verified index's manifests verify too (their digests are in the signed bytes)."""
        if result.media_type not in INDEXES or result.data is None:
            return
        try:
            children, _ = references(loads_json(result.data))
        except ValueError:
            return
        for child in children:
            self._verdicts[(route.key, str(child))] = (
                Verdict(True, f"named by signed index {result.digest} ({verdict.reason})",
                        key_id=verdict.key_id), float("inf"))
