"""The referrers list a repository's store holds for a digest: the manifests recorded as
referring to it that are stored and linked to the repository (hosted: pushed there; cached:
pulled through from the upstream's list). One builder for both kinds of repository."""

from __future__ import annotations

from typing import Any

from proxy.policy.referrers import referrer_descriptor
from proxy.reference import Digest
from proxy.storage.base import Store


async def stored_referrers(store: Store, name: str, subject: Digest) -> list[dict[str, Any]]:
    """The descriptors of ``subject``'s referrers in repository ``name`` (storage key)."""
    entries = []
    for digest in await store.list_referrers(name, subject):
        item = await store.get_manifest(digest)
        if item is None or not await store.has_manifest_link(name, digest):
            continue
        entry = referrer_descriptor(digest, item.media_type, item.data, subject)
        if entry is not None:
            entries.append(entry)
    return entries
