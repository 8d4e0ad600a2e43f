"""Upgrading a store to the current repository layout, once, at start-up.

Layout 2 (this version) keeps every cached repository under ``<upstream>/<remote name>``
(see :mod:`proxy.routing`). Layout 1 kept the default upstream's cached repositories
under their bare names (``library/alpine``), where a hosted repository of the same name
shared their keys. Upgrading moves each bare-named repository that is neither hosted nor
already under an upstream's name to ``<default upstream>/<name>`` (hosted ones stay), and
links to every cached repository what its manifests reference, since layout 2 serves a
repository only the objects linked to it.
The version is then recorded, so the move never runs twice (a hosted pattern removed
later must not turn hosted content into cache).
"""

from __future__ import annotations

import logging

from proxy.config import Config
from proxy.pullthrough.links import RepositoryLinks
from proxy.routing import Namespaces
from proxy.storage import Store
from proxy.storage.backend import open_store

log = logging.getLogger("regproxy.layout")

LAYOUT_VERSION = 2


class LayoutError(Exception):
    """The store cannot be upgraded as configured (the message says how to proceed)."""


async def upgrade(store: Store, names: Namespaces) -> list[tuple[str, str]]:
    """Bring ``store`` to :data:`LAYOUT_VERSION`; returns the ``(old, new)`` keys moved.

    Run by one process before it serves (the parent of the workers; for several replicas
    on one bucket, moving is idempotent, so replicas starting together do no harm)."""
    version = await store.layout_version()
    if version == LAYOUT_VERSION:
        return []
    if version is not None and version > LAYOUT_VERSION:
        raise LayoutError(f"the store has layout {version}, newer than this regproxy "
                          f"understands ({LAYOUT_VERSION}); upgrade regproxy")
    keys = await store.list_repositories()
    moves = [(key, f"{names.default}/{key}") for key in keys
             if not names.is_cached_key(key) and not names.is_hosted(key)]
    if moves and names.default is None:
        raise LayoutError(
            f"the store holds {len(moves)} repositories of layout 1 (e.g. {moves[0][0]!r}) "
            "that are neither hosted nor under an upstream's name, and no default upstream "
            "is configured to move them under; set proxy.default_upstream for one start, or "
            "delete repositories/<name> for each")
    for old, new in moves:
        await store.rename_repository(old, new)
    # layout 1 linked no blobs to cached repositories; layout 2 serves a cached repository
    # only what is linked to it: link what each one's manifests reference
    links = RepositoryLinks(store, capacity=0)
    for key in await store.list_repositories():
        if names.is_cached_key(key):
            for digest in await store.list_manifest_links(key):
                item = await store.get_manifest(digest)
                if item is not None:
                    await links.add_manifest(key, item)
    if moves:
        log.warning("store layout upgraded to %d: %d cached repositories of the default "
                    "upstream moved under %s/", LAYOUT_VERSION, len(moves), names.default)
    await store.set_layout_version(LAYOUT_VERSION)
    return moves


async def upgrade_configured(config: Config) -> list[tuple[str, str]]:
    """:func:`upgrade` on the store ``config`` names (for the parent of the workers)."""
    async with open_store(config, clean=False) as (store, _):
        return await upgrade(store, Namespaces(config.upstreams, config.default_upstream,
                                               config.hosted))
