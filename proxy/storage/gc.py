"""Mark-and-sweep garbage collection of the store, safe while the server runs.

Mark: every tag of every repository (hosted and cached), every manifest link unless
``delete_untagged``, and every referrer of a kept manifest; manifests mark their children,
config and layers. Sweep: objects not marked *and* older than the grace period. Everything
that makes an object live again while GC runs (an upload, a mount, a cache fill, a pushed
manifest) gives it a fresh mtime, so the grace period protects it without a read-only mode.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.mediatypes import references as manifest_references
from proxy.reference import Digest
from proxy.storage.filesystem import FilesystemStore


@dataclass
class GCReport:
    """What a run removed (or would remove, in a dry run)."""

    blobs: list[tuple[Digest, int]] = field(default_factory=list)
    untagged: list[tuple[str, Digest]] = field(default_factory=list)
    kept: int = 0

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.blobs)


def references(store: FilesystemStore, digest: Digest) -> tuple[list[Digest], list[Digest]]:
    """(child manifests, blobs) referenced by a stored manifest (nothing for a plain blob)."""
    item = store.get_manifest(digest)
    if item is None:
        return [], []
    try:
        return manifest_references(json.loads(item.data))
    except ValueError:
        return [], []


def mark_reachable(store: FilesystemStore, roots: Iterable[Digest], into: set[Digest]) -> set[Digest]:
    """Add to ``into`` the roots and everything they reference (child manifests, config,
    layers), transitively; returns ``into``. The one graph walk GC, eviction and purge share."""
    stack = list(roots)
    while stack:
        d = stack.pop()
        if d in into:
            continue
        into.add(d)
        manifests, blobs = references(store, d)
        stack.extend(manifests)
        into.update(blobs)
    return into


def image_size(store: FilesystemStore, digest: Digest) -> int:
    """Bytes of a manifest and everything it references that is stored."""
    return sum(store.blob_size(d) or 0 for d in mark_reachable(store, [digest], set()))


def collect(store: FilesystemStore, *, dry_run: bool = False, delete_untagged: bool = False,
            grace: float = 3600.0) -> GCReport:
    """Run one GC pass over ``store``."""
    started = time.time()
    report = GCReport()
    live: set[Digest] = set()

    def mark(digest: Digest) -> None:
        mark_reachable(store, [digest], live)

    for repo in store.list_repositories():
        roots = [d for t in store.list_tags(repo) or [] if (d := store.get_tag(repo, t))]
        links = store.list_manifest_links(repo)
        if not delete_untagged:
            roots += links
        for root in roots:
            mark(root)
        # referrers of kept manifests are kept too (signatures, SBOMs), to a fixpoint
        changed = True
        while changed:
            changed = False
            for d in [x for x in links if x in live]:
                for ref in store.list_referrers(repo, d):
                    if ref not in live:
                        mark(ref)
                        changed = True
        for d in links:
            if d not in live:
                report.untagged.append((repo, d))

    cutoff = started - grace
    for digest in store.iter_blob_digests():
        if digest in live:
            report.kept += 1
            continue
        path = store.blob_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_mtime >= cutoff:
            report.kept += 1
            continue
        report.blobs.append((digest, st.st_size))
    if dry_run:
        return report
    for repo, digest in report.untagged:
        store.unlink_manifest(repo, digest)
    for digest, _ in report.blobs:
        path = store.blob_path(digest)
        try:  # re-check right before deleting: a concurrent writer may have revived it
            if os.stat(path).st_mtime >= cutoff:
                continue
            store.forget_manifest(digest)
            os.unlink(path)
        except FileNotFoundError:
            continue
    return report
