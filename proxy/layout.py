"""Upgrading a store to the current repository layout, once, at start-up.

Layout 3 (this version) keeps every cached repository under ``<upstream>/<remote name>``,
an upstream named ``host:port`` as ``host_port`` (see :mod:`proxy.routing`); layout 2 kept
such keys as ``host:port/...``, which the upgrade renames. Layout 1 kept the default
upstream's cached repositories under their bare names (``library/alpine``), where a hosted
repository of the same name shared their keys. Upgrading moves each bare-named repository
that is neither hosted nor already under an upstream's name to ``<default
upstream>/<name>`` (hosted ones stay), and links to every cached repository what its
manifests reference, since layout 2 serves a repository only the objects linked to it. The
version is then recorded, so the move never runs twice (a hosted pattern removed later
must not turn hosted content into cache).
"""

from __future__ import annotations

import asyncio
import logging

from proxy.config import Config, path_form
from proxy.routing import Namespaces
from proxy.storage import Staging, Store
from proxy.storage.backend import open_store
from proxy.storage.links import RepositoryLinks

log = logging.getLogger("regproxy.layout")

LAYOUT_VERSION = 3


class LayoutError(Exception):
    """The store cannot be upgraded as configured (the message says how to proceed)."""


async def upgrade(store: Store, names: Namespaces) -> list[tuple[str, str]]:
    """Bring ``store`` to :data:`LAYOUT_VERSION`; returns the ``(old, new)`` keys moved.

    Called through :func:`ensure`, which runs it once per host at a time; replicas
    starting together on one bucket do no harm (moving is idempotent)."""
    version = await store.layout_version()
    if version == LAYOUT_VERSION:
        return []
    if version is not None and version > LAYOUT_VERSION:
        raise LayoutError(f"the store has layout {version}, newer than this regproxy "
                          f"understands ({LAYOUT_VERSION}); upgrade regproxy")
    # layout 2 -> 3: keys of an upstream named host:port take its path form, host_port
    # (no repository name holds a ':', so every such key is one of those)
    ported = [(key, path_form(key.partition("/")[0]) + key[key.index("/"):])
              for key in await store.list_repositories() if ":" in key.partition("/")[0]]
    for old, new in ported:
        await store.rename_repository(old, new)
    if ported:
        log.warning("store layout upgraded to %d: %d cached repositories of upstreams named "
                    "host:port moved under host_port/", LAYOUT_VERSION, len(ported))
    if version is not None:  # layout 2 had no bare cached names
        await store.set_layout_version(LAYOUT_VERSION)
        return ported
    keys = await store.list_repositories()
    default = None if names.default is None else path_form(names.default)
    moves = [(key, f"{default}/{key}") for key in keys
             if not names.is_cached_key(key) and not names.is_hosted(key)]
    for key, _ in moves:
        if await store.list_blob_links(key):  # only pushes linked blobs in layout 1
            raise LayoutError(
                f"repository {key!r} holds pushed blobs but matches no [hosted] pattern; "
                "add its pattern to hosted.repositories (or delete repositories/"
                f"{key}) and start again: it is not moved into the cache")
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
                    await links.add_manifest(key, item, stored_too=True)
    if moves:
        log.warning("store layout upgraded to %d: %d cached repositories of the default "
                    "upstream moved under %s/", LAYOUT_VERSION, len(moves), names.default)
    await store.set_layout_version(LAYOUT_VERSION)
    return ported + moves



async def ensure(store: Store, staging: Staging, names: Namespaces,
                 retry: float = 5.0) -> asyncio.Task[None] | None:
    """Upgrade before serving, one process of the host at a time (sibling workers wait
    for the lock, then find the version recorded). When the store cannot be reached (an
    object store that is down: ``/readyz`` says so), the upgrade is retried in the
    background every ``retry`` seconds; that task is returned, for the caller to cancel."""
    try:
        await _upgrade_locked(store, staging, names)
        return None
    except LayoutError:
        raise
    except Exception as exc:  # botocore and aiohttp errors of an unreachable endpoint
        log.error("cannot check the store's layout (%s); retrying every %.0f s",
                  type(exc).__name__, retry)

    async def keep_trying() -> None:
        while True:
            await asyncio.sleep(retry)
            try:
                await _upgrade_locked(store, staging, names)
                return
            except LayoutError as exc:
                log.error("store layout: %s", exc)
                return
            except Exception as exc:
                log.debug("store layout check failed again: %s", type(exc).__name__)

    return asyncio.create_task(keep_trying())


async def _upgrade_locked(store: Store, staging: Staging, names: Namespaces) -> None:
    while True:
        with staging.try_lock("layout-upgrade") as mine:
            if mine:
                await upgrade(store, names)
                return
        await asyncio.sleep(0.05)


async def upgrade_before_workers(config: Config) -> None:
    """The parent of the workers upgrades first, so that a store that cannot be upgraded
    stops start-up once (not a worker crash loop); an unreachable store is left to the
    workers' :func:`ensure`, which retries."""
    try:
        async with open_store(config, clean=False) as (store, _staging):
            await upgrade(store, Namespaces(config.upstreams, config.default_upstream,
                                            config.hosted))
    except LayoutError:
        raise
    except Exception as exc:
        log.error("cannot check the store's layout before starting workers (%s)",
                  type(exc).__name__)
