"""``regproxy cache ls`` and ``regproxy cache purge``: offline commands on the store.

They refuse a directory that is not a store (opening one would create an empty store there
and print nothing). A purge changes the store's purge marker, which running servers read
about once a second to drop what they hold in memory; with Redis it also deletes the
purged tags from the shared tag cache, so no replica answers them from there.
"""

from __future__ import annotations

import argparse
import sys
import time

from proxy.config import Config
from proxy.errors import RegistryError
from proxy.pullthrough.tags import tag_key
from proxy.reference import Digest, parse_reference, validate_name
from proxy.routing import Namespaces
from proxy.sharedcache import make_cache
from proxy.storage.backend import open_store
from proxy.storage.base import Store
from proxy.storage.eviction import purge
from proxy.storage.gc import image_size, mark_reachable
from proxy.units import human_size


def store_problem(config: Config) -> str | None:
    """Why ``config``'s storage is not a store to inspect (``None``: it is one). The S3
    backend is not checked here: opening it creates nothing."""
    root = config.storage_root
    if config.s3 is None and not (root / "blobs").is_dir():
        return (f"{root} is not a regproxy store (no blobs/ in it); give the server's "
                "--data-dir, or --config with its storage.root")
    return None


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


async def run(config: Config, args: argparse.Namespace) -> int:
    """``cache ls`` (0) or ``cache purge IMAGE`` (0; 1 when nothing was cached under that
    name; 2 for a bad or hosted name)."""
    names = Namespaces(config.upstreams, config.default_upstream, config.hosted)
    if args.cache_command == "ls":
        async with open_store(config, clean=False) as (store, _):
            await _list(store, names)
        return 0
    return await _purge(config, names, args.image)


async def _list(store: Store, names: Namespaces) -> None:
    used = {s.digest: s.last_used async for s in store.blob_stats()}
    print(f"{'REPOSITORY':40} {'TAG':20} {'DIGEST':19} {'SIZE':>10}  LAST USED")
    roots: set[Digest] = set()
    repositories = 0
    for key in await store.list_repositories():
        if names.is_hosted_key(key):
            continue
        repo = names.name_of_key(key) or key
        listed = False
        for tag in await store.list_tags(key) or []:
            digest = await store.get_tag(key, tag)
            if digest is None or not await store.has_manifest(digest):
                continue
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(used.get(digest, 0)))
            size = human_size(await image_size(store, digest))
            print(f"{repo:40} {tag:20} {str(digest)[:19]:19} {size:>10}  {when}")
            roots.add(digest)
            listed = True
        repositories += listed
    blobs = await mark_reachable(store, roots, set())
    total = sum([await store.blob_size(d) or 0 for d in blobs])
    print(f"total: {_plural(len(roots), 'image', 'images')} in "
          f"{_plural(repositories, 'repository', 'repositories')}, {human_size(total)} "
          "(what images share counted once)")


def _parse(image: str) -> tuple[str, str | Digest | None]:
    """``NAME:TAG``, ``NAME@DIGEST`` or a bare ``NAME`` (every tag)."""
    name, sep, ref = image.rpartition("@")
    if not sep:
        head, sep, tail = image.rpartition(":")
        name, ref = (head, tail) if sep and "/" not in tail else (image, "")
    validate_name(name)
    return name, parse_reference(ref) if ref else None


async def _purge(config: Config, names: Namespaces, image: str) -> int:
    try:
        name, reference = _parse(image)
        if names.is_hosted(name):
            print(f"regproxy: {name} is a hosted repository; delete through the API", file=sys.stderr)
            return 2
        key = names.place(name).key
    except RegistryError as exc:
        print(f"regproxy: {image!r}: {exc.message} (expected NAME, NAME:TAG or NAME@DIGEST)",
              file=sys.stderr)
        return 2
    async with open_store(config, clean=False) as (store, _):
        targets: list[str | Digest]
        if reference is None:  # the whole cached repository: every tag, then what is left
            targets = [*(await store.list_tags(key) or []), *await store.list_manifest_links(key)]
        elif isinstance(reference, Digest):
            targets = [reference] if await store.has_manifest_link(key, reference) else []
        else:
            targets = [reference] if await store.get_tag(key, reference) is not None else []
        if not targets:
            print(f"regproxy: nothing cached as {image}", file=sys.stderr)
            return 1
        count = freed = 0
        for target in targets:
            if isinstance(target, Digest) and not await store.has_manifest_link(key, target):
                continue  # (unlinked with a tag just purged)
            removed = await purge(store, key, target, names.is_hosted_key)
            count, freed = count + len(removed), freed + sum(s for _, s in removed)
            if isinstance(target, str) or removed:
                label = f"{name}@{target}" if isinstance(target, Digest) else f"{name}:{target}"
                print(f"purged {label}: {_plural(len(removed), 'object', 'objects')}, "
                      f"{human_size(sum(s for _, s in removed))}")
        if len(targets) > 1:
            print(f"purged {name}: {_plural(count, 'object', 'objects')}, {human_size(freed)}")
        await store.mark_purge()
        tags = make_cache(config.cache_backend, config.cache_url, "tag")
        try:
            if tags.shared:
                for target in targets:
                    if isinstance(target, str):
                        await tags.delete(tag_key(key, target))
        finally:
            await tags.close()
    print("running servers drop it from memory within a second")
    return 0
