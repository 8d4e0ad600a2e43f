"""Mark-and-sweep garbage collection of the store, safe while the server runs.

Mark: every tag of every repository (hosted and cached), every manifest link unless
``delete_untagged``, and every referrer of a kept manifest; manifests mark their children,
config and layers. Sweep: objects not marked *and* older than the grace period. Everything
that makes an object live again while GC runs (an upload, a mount, a cache fill, a pushed
manifest) gives it a fresh mtime, so the grace period protects it without a read-only mode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.mediatypes import references as manifest_references
from proxy.reference import Digest
from proxy.storage.base import Store


@dataclass
class GCReport:
    """What a run removed (or would remove, in a dry run)."""

    blobs: list[tuple[Digest, int]] = field(default_factory=list)
    untagged: list[tuple[str, Digest]] = field(default_factory=list)
    kept: int = 0
    incomplete: int = 0  #: abandoned temp writes removed (multipart uploads on S3)

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.blobs)


async def references(store: Store, digest: Digest) -> tuple[list[Digest], list[Digest]]:
    """(child manifests, blobs) referenced by a stored manifest (nothing for a plain blob)."""
    item = await store.get_manifest(digest)
    if item is None:
        return [], []
    try:
        return manifest_references(json.loads(item.data))
    except ValueError:
        return [], []


async def mark_reachable(store: Store, roots: Iterable[Digest], into: set[Digest]
                         ) -> set[Digest]:
    """Add to ``into`` the roots and everything they reference (child manifests, config,
    layers), transitively; returns ``into``. The one graph walk GC, eviction and purge share."""
    stack = list(roots)
    while stack:
        d = stack.pop()
        if d in into:
            continue
        into.add(d)
        manifests, blobs = await references(store, d)
        stack.extend(manifests)
        into.update(blobs)
    return into


async def image_size(store: Store, digest: Digest) -> int:
    """Bytes of a manifest and everything it references that is stored."""
    return sum([await store.blob_size(d) or 0
                for d in await mark_reachable(store, [digest], set())])


async def collect(store: Store, *, dry_run: bool = False, delete_untagged: bool = False,
            grace: float = 3600.0) -> GCReport:
    """Run one GC pass over ``store``."""
    started = time.time()
    report = GCReport()
    live: set[Digest] = set()

    for repo in await store.list_repositories():
        roots = [d for t in await store.list_tags(repo) or []
                 if (d := await store.get_tag(repo, t))]
        links = await store.list_manifest_links(repo)
        if not delete_untagged:
            roots += links
        await mark_reachable(store, roots, live)
        # referrers of kept manifests are kept too (signatures, SBOMs), to a fixpoint
        changed = True
        while changed:
            changed = False
            for d in [x for x in links if x in live]:
                for ref in await store.list_referrers(repo, d):
                    if ref not in live:
                        await mark_reachable(store, [ref], live)
                        changed = True
        for d in links:
            if d not in live:
                report.untagged.append((repo, d))

    cutoff = started - grace
    async for stat in store.blob_stats():
        if stat.digest in live or stat.last_used >= cutoff:
            report.kept += 1
            continue
        report.blobs.append((stat.digest, stat.size))
    if dry_run:
        return report
    for repo, digest in report.untagged:
        await store.unlink_manifest(repo, digest)
    for digest, _ in report.blobs:
        # re-checked right before deleting: a concurrent writer may have revived it
        await store.delete_blob(digest, older_than=cutoff)
    # a running fill's upload is younger than this: no fill takes a day
    report.incomplete = await store.purge_incomplete(started - max(grace, 86400.0))
    return report
