"""Keeping cached (upstream) content within a budget: reference-aware LRU eviction.

The last access of an object is its file's mtime in the store: the pull-through service
touches it on every hit (HEADs included, throttled per process), so recency survives
restarts and is shared by every process on the same storage. A blob's recency is the
latest of its own and of every cached manifest that references it, so a layer shared by
two images goes only when neither image was used recently. Hosted content (pushed to a
hosted repository) is never evicted, even when the same bytes are also cached.

Evicting a blob being read is harmless on POSIX (the reader keeps its file open) and on
S3 (a GET in flight completes); blobs being filled are not stored yet, so not candidates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.reference import Digest
from proxy.storage.base import Store
from proxy.storage.gc import mark_reachable, references

#: What each manifest references: (child manifests, blobs), by the manifest's digest.
References = dict[Digest, tuple[list[Digest], list[Digest]]]


@dataclass
class EvictionReport:
    """What one pass found and removed."""

    cached_bytes: int = 0  #: evictable bytes before the pass: blobs no hosted content uses
    evicted: list[tuple[Digest, int]] = field(default_factory=list)
    shared_bytes: int = 0  #: blobs both cached and hosted content use (never evicted)
    hosted_bytes: int = 0  #: blobs only hosted content uses

    @property
    def evicted_bytes(self) -> int:
        return sum(size for _, size in self.evicted)

    @property
    def remaining_bytes(self) -> int:
        """Evictable bytes after the pass (what ``max_size`` limits)."""
        return self.cached_bytes - self.evicted_bytes

    @property
    def cache_bytes(self) -> int:
        """Bytes of what cached content uses after the pass, shared blobs included."""
        return self.remaining_bytes + self.shared_bytes

    @property
    def stored_bytes(self) -> int:
        """Bytes of every blob in the store after the pass."""
        return self.remaining_bytes + self.shared_bytes + self.hosted_bytes


async def evict(
    store: Store,
    *,
    max_size: int,
    max_age: float,
    is_hosted: Callable[[str], bool],
    dry_run: bool = False,
    now: float | None = None,
    known_refs: References | None = None,
) -> EvictionReport:
    """Evict least recently used cached content until under ``max_size`` (0: no size
    limit) and nothing is older than ``max_age`` seconds (0: no age limit).

    ``known_refs`` carries what manifests reference from one pass to the next (a manifest
    never changes under its digest): reading and parsing every cached manifest again was
    ~45 % of a pass, and passes run every second or two while fills add content. Entries
    of objects that are gone are dropped from it."""
    now = time.time() if now is None else now
    protected: set[Digest] = set()
    cached_manifests: dict[Digest, list[str]] = {}
    for repo in await store.list_repositories():
        links = await store.list_manifest_links(repo)
        if is_hosted(repo):
            await mark_reachable(store, [*links, *await store.list_blob_links(repo)], protected)
        else:
            for d in links:
                cached_manifests.setdefault(d, []).append(repo)

    sizes: dict[Digest, int] = {}
    recency: dict[Digest, float] = {}
    async for stat in store.blob_stats():
        sizes[stat.digest] = stat.size
        recency[stat.digest] = stat.last_used
    refs = {} if known_refs is None else known_refs  # each manifest parsed once
    unreadable: set[Digest] = set()  # (not stored, or no references: not kept in ``refs``)
    used_by_cache: set[Digest] = set(cached_manifests)  # what cached manifests reach

    async def propagate(digest: Digest, when: float, seen: set[Digest]) -> None:
        found = refs.get(digest)
        if found is None:
            found = ([], []) if digest in unreadable else await references(store, digest)
            if found[0] or found[1]:  # (a manifest still being written: next pass looks again)
                refs[digest] = found
            else:
                unreadable.add(digest)
        manifests, blobs = found
        used_by_cache.update(blobs)
        used_by_cache.update(manifests)
        for b in blobs:
            if b in recency and recency[b] < when:
                recency[b] = when
        for m in manifests:
            if m not in seen:
                seen.add(m)
                if m in recency and recency[m] < when:
                    recency[m] = when
                await propagate(m, max(when, recency.get(m, when)), seen)

    for manifest in sorted(cached_manifests, key=lambda d: recency.get(d, 0.0)):
        if manifest in recency:
            await propagate(manifest, recency[manifest], {manifest})

    candidates = [d for d in sizes if d not in protected]
    report = EvictionReport(
        cached_bytes=sum(sizes[d] for d in candidates),
        shared_bytes=sum(size for d, size in sizes.items() if d in protected and d in used_by_cache),
        hosted_bytes=sum(size for d, size in sizes.items()
                         if d in protected and d not in used_by_cache))
    remaining = report.cached_bytes
    cutoff = now - max_age if max_age > 0 else None
    for digest in sorted(candidates, key=lambda d: recency[d]):
        too_big = max_size > 0 and remaining > max_size
        too_old = cutoff is not None and recency[digest] < cutoff
        if not too_big and not too_old:
            break
        report.evicted.append((digest, sizes[digest]))
        remaining -= sizes[digest]
    for digest in [d for d in refs if d not in sizes]:
        del refs[digest]
    if dry_run:
        return report
    for digest, _ in report.evicted:
        if digest in cached_manifests:
            for repo in cached_manifests[digest]:
                await store.unlink_manifest(repo, digest)
        await store.delete_blob(digest)
        refs.pop(digest, None)
    return report


async def purge(store: Store, name: str, reference: str | Digest,
                is_hosted: Callable[[str], bool]) -> list[tuple[Digest, int]]:
    """Remove a cached image (a tag, or a manifest by digest) and the content only it used.

    Returns what was deleted. Content still referenced by another manifest in any
    repository, or pushed to a hosted one, stays. (A cached repository's blob links only
    record what its upstream vouched for: they keep nothing.)
    """
    if isinstance(reference, Digest):
        roots = [reference] if await store.has_manifest_link(name, reference) else []
        await store.unlink_manifest(name, reference)
    else:
        digest = await store.get_tag(name, reference)
        await store.delete_tag(name, reference)
        still_tagged = digest is not None and digest in [
            await store.get_tag(name, t) for t in await store.list_tags(name) or []]
        roots = [digest] if digest is not None and not still_tagged else []
        if roots:
            await store.unlink_manifest(name, roots[0])
    if not roots:
        return []
    candidates = await mark_reachable(store, roots, set())
    still_used: set[Digest] = set()
    for repo in await store.list_repositories():
        blobs = await store.list_blob_links(repo) if is_hosted(repo) else []
        await mark_reachable(store, [*await store.list_manifest_links(repo), *blobs], still_used)
    removed = []
    for d in candidates - still_used:
        size = await store.blob_size(d)
        if size is not None and await store.delete_blob(d):
            removed.append((d, size))
    return removed
