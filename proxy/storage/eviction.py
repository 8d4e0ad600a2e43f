"""Keeping cached (upstream) content within a budget: reference-aware LRU eviction.

The last access of an object is its file's mtime in the store: the pull-through service
touches it on every hit (HEADs included, throttled per process), so recency survives
restarts and is shared by every process on the same storage. A blob's recency is the
latest of its own and of every cached manifest that references it, so a layer shared by
two images goes only when neither image was used recently. Hosted content (pushed to a
hosted repository) is never evicted, even when the same bytes are also cached.

Evicting a blob being read is harmless on POSIX (the reader keeps its file open); blobs
being filled live in ``tmp/`` and are not candidates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.reference import Digest
from proxy.storage.filesystem import FilesystemStore
from proxy.storage.gc import mark_reachable, references


@dataclass
class EvictionReport:
    """What one pass found and removed."""

    cached_bytes: int = 0  #: cached bytes before the pass
    evicted: list[tuple[Digest, int]] = field(default_factory=list)

    @property
    def evicted_bytes(self) -> int:
        return sum(size for _, size in self.evicted)

    @property
    def remaining_bytes(self) -> int:
        return self.cached_bytes - self.evicted_bytes


def evict(
    store: FilesystemStore,
    *,
    max_size: int,
    max_age: float,
    is_hosted: Callable[[str], bool],
    dry_run: bool = False,
    now: float | None = None,
) -> EvictionReport:
    """Evict least recently used cached content until under ``max_size`` (0: no size
    limit) and nothing is older than ``max_age`` seconds (0: no age limit)."""
    now = time.time() if now is None else now
    protected: set[Digest] = set()
    cached_manifests: dict[Digest, list[str]] = {}
    for repo in store.list_repositories():
        links = store.list_manifest_links(repo)
        if is_hosted(repo):
            mark_reachable(store, [*links, *store.list_blob_links(repo)], protected)
        else:
            for d in links:
                cached_manifests.setdefault(d, []).append(repo)

    sizes: dict[Digest, int] = {}
    recency: dict[Digest, float] = {}
    for digest in store.iter_blob_digests():
        try:
            st = os.stat(store.blob_path(digest))
        except FileNotFoundError:
            continue
        sizes[digest] = st.st_size
        recency[digest] = st.st_mtime

    def propagate(digest: Digest, when: float, seen: set[Digest]) -> None:
        manifests, blobs = references(store, digest)
        for b in blobs:
            if b in recency and recency[b] < when:
                recency[b] = when
        for m in manifests:
            if m not in seen:
                seen.add(m)
                if m in recency and recency[m] < when:
                    recency[m] = when
                propagate(m, max(when, recency.get(m, when)), seen)

    for manifest in sorted(cached_manifests, key=lambda d: recency.get(d, 0.0)):
        if manifest in recency:
            propagate(manifest, recency[manifest], {manifest})

    candidates = [d for d in sizes if d not in protected]
    report = EvictionReport(cached_bytes=sum(sizes[d] for d in candidates))
    remaining = report.cached_bytes
    cutoff = now - max_age if max_age > 0 else None
    for digest in sorted(candidates, key=lambda d: recency[d]):
        too_big = max_size > 0 and remaining > max_size
        too_old = cutoff is not None and recency[digest] < cutoff
        if not too_big and not too_old:
            break
        report.evicted.append((digest, sizes[digest]))
        remaining -= sizes[digest]
    if dry_run:
        return report
    for digest, _ in report.evicted:
        if digest in cached_manifests:
            for repo in cached_manifests[digest]:
                store.unlink_manifest(repo, digest)
        store.forget_manifest(digest)
        try:
            os.unlink(store.blob_path(digest))
        except FileNotFoundError:
            continue
    return report


def purge(store: FilesystemStore, name: str, reference: str | Digest) -> list[tuple[Digest, int]]:
    """Remove a cached image (a tag, or a manifest by digest) and the content only it used.

    Returns what was deleted. Content still referenced by another manifest in any
    repository stays.
    """
    if isinstance(reference, Digest):
        roots = [reference] if store.has_manifest_link(name, reference) else []
        store.unlink_manifest(name, reference)
    else:
        digest = store.get_tag(name, reference)
        store.delete_tag(name, reference)
        still_tagged = digest is not None and any(
            store.get_tag(name, t) == digest for t in store.list_tags(name) or [])
        roots = [digest] if digest is not None and not still_tagged else []
        if roots:
            store.unlink_manifest(name, roots[0])
    if not roots:
        return []
    candidates = mark_reachable(store, roots, set())
    still_used: set[Digest] = set()
    for repo in store.list_repositories():
        mark_reachable(store, [*store.list_manifest_links(repo), *store.list_blob_links(repo)],
                       still_used)
    removed = []
    for d in candidates - still_used:
        size = store.blob_size(d)
        if size is None:
            continue
        store.forget_manifest(d)
        os.unlink(store.blob_path(d))
        removed.append((d, size))
    return removed
