"""The repository semantics (proxy.storage.registry.RegistryStore, the Store protocol) on
every driver: tags, links, referrers, the catalog, renames, the layout version, the purge
marker, objects and their last use. Each test runs once per backend, on an empty store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from proxy.errors import DigestInvalid
from proxy.reference import Digest
from proxy.storage import RegistryStore
from tests.storage.driver_contract import clock_past, settled

D1, D2, D3 = Digest.of(b"one"), Digest.of(b"two"), Digest.of(b"three")
REPO = "docker.io/library/alpine"


async def _read(store: RegistryStore, digest: Digest, start: int = 0, end: int | None = None
                ) -> bytes:
    return b"".join([chunk async for chunk in store.open_blob(digest, start, end)])


async def _last_used(store: RegistryStore, digest: Digest) -> float | None:
    used = {s.digest: s.last_used async for s in store.blob_stats()}
    return used.get(digest)


# -- tags ----------------------------------------------------------------------------------


async def test_tags_point_at_digests(store: RegistryStore):
    assert await store.get_tag(REPO, "latest") is None
    assert await store.tag_with_age(REPO, "latest") == (None, 0.0)
    await store.set_tag(REPO, "latest", D1)
    await store.set_tag(REPO, "v1", D1)
    await store.set_tag(REPO, "latest", D2)
    assert await store.get_tag(REPO, "latest") == D2
    digest, age = await store.tag_with_age(REPO, "v1")
    assert digest == D1 and 0.0 <= age < 30
    assert await store.list_tags(REPO) == ["latest", "v1"]
    assert await store.delete_tag(REPO, "v1")
    assert not await store.delete_tag(REPO, "v1")
    assert await store.list_tags(REPO) == ["latest"]


async def test_a_confirmed_tag_is_fresh_again_an_unconfirmed_rewrite_is_not(
        store: RegistryStore):
    await store.set_tag(REPO, "latest", D1)
    _, age = await store.tag_with_age(REPO, "latest")
    await clock_past(time.time() - age)
    await store.set_tag(REPO, "latest", D1)  # the same digest, unconfirmed: nothing changes
    _, aged = await store.tag_with_age(REPO, "latest")
    assert aged >= 1.0
    await store.set_tag(REPO, "latest", D1, confirmed=True)
    digest, fresh = await store.tag_with_age(REPO, "latest")
    assert digest == D1 and fresh < aged


# -- links and referrers -------------------------------------------------------------------


async def test_manifest_links_and_their_tags(store: RegistryStore):
    assert await store.list_tags(REPO) is None  # no such repository
    await store.link_manifest(REPO, D1)
    await store.link_manifest(REPO, D1)  # idempotent
    assert await store.list_tags(REPO) == []  # a repository without tags
    await store.link_manifest(REPO, D2)
    await store.set_tag(REPO, "a", D1)
    await store.set_tag(REPO, "b", D1)
    await store.set_tag(REPO, "c", D2)
    assert await store.has_manifest_link(REPO, D1)
    assert not await store.has_manifest_link("other/repo", D1)
    assert sorted(await store.list_manifest_links(REPO), key=str) == sorted([D1, D2], key=str)
    assert await store.unlink_manifest(REPO, D1)  # its tags go with it
    assert not await store.unlink_manifest(REPO, D1)
    assert not await store.has_manifest_link(REPO, D1)
    assert await store.list_tags(REPO) == ["c"]
    assert await store.list_manifest_links(REPO) == [D2]


async def test_blob_links(store: RegistryStore):
    await store.link_blob(REPO, D1)
    assert await store.list_tags(REPO) == []  # linked blobs make a repository too
    assert await store.has_blob_link(REPO, D1)
    assert not await store.has_blob_link(REPO, D2)
    assert not await store.has_manifest_link(REPO, D1)  # a kind of its own
    assert await store.list_blob_links(REPO) == [D1]
    assert await store.unlink_blob(REPO, D1)
    assert not await store.unlink_blob(REPO, D1)
    assert await store.list_blob_links(REPO) == []


async def test_referrers(store: RegistryStore):
    assert await store.list_referrers(REPO, D1) == []
    await store.add_referrer(REPO, D1, D3)
    await store.add_referrer(REPO, D1, D2)
    await store.add_referrer(REPO, D2, D3)
    assert await store.list_referrers(REPO, D1) == sorted([D2, D3], key=str)
    await store.remove_referrer(REPO, D1, D3)
    await store.remove_referrer(REPO, D1, D3)  # absent: no error
    assert await store.list_referrers(REPO, D1) == [D2]
    assert await store.list_referrers(REPO, D2) == [D3]


# -- the catalog and renames ---------------------------------------------------------------


async def test_the_catalog_lists_repositories_holding_something(store: RegistryStore):
    assert await store.list_repositories() == []
    await store.set_tag("library/a", "v1", D1)
    await store.link_manifest("library/a/nested", D1)
    await store.link_blob("team/app", D2)
    await store.add_referrer("only/referrers", D1, D2)  # no tag, no link: not a repository
    assert await store.list_repositories() == ["library/a", "library/a/nested", "team/app"]


async def test_rename_merges_into_the_target_and_leaves_nested_ones(store: RegistryStore):
    await store.set_tag("library/a", "v1", D1)
    await store.set_tag("library/a", "old", D1)
    await store.link_manifest("library/a", D1)
    await store.link_blob("library/a", D2)
    await store.add_referrer("library/a", D1, D2)
    await store.set_tag("library/a/nested", "v2", D2)
    await store.set_tag("docker.io/library/a", "old", D2)  # already there: it wins
    await store.rename_repository("library/a", "docker.io/library/a")
    assert await store.get_tag("docker.io/library/a", "v1") == D1
    assert await store.get_tag("docker.io/library/a", "old") == D2
    assert await store.has_manifest_link("docker.io/library/a", D1)
    assert await store.has_blob_link("docker.io/library/a", D2)
    assert await store.list_referrers("docker.io/library/a", D1) == [D2]
    assert await store.get_tag("library/a", "v1") is None
    assert not await store.has_manifest_link("library/a", D1)
    assert await store.get_tag("library/a/nested", "v2") == D2
    assert await store.list_repositories() == ["docker.io/library/a", "library/a/nested"]


# -- layout and purges ---------------------------------------------------------------------


async def test_layout_version_is_recorded(store: RegistryStore):
    assert await store.layout_version() is None
    await store.set_layout_version(2)
    assert await store.layout_version() == 2
    await store.set_layout_version(3)
    assert await store.layout_version() == 3


async def test_the_purge_marker_changes_with_every_purge(store: RegistryStore):
    assert await store.purge_marker() is None
    await store.mark_purge()
    first = await store.purge_marker()
    await store.mark_purge()
    second = await store.purge_marker()
    assert first and second and first != second


# -- objects -------------------------------------------------------------------------------


async def test_manifests_keep_their_bytes_and_media_type(store: RegistryStore):
    data = b'{"schemaVersion": 2}'
    digest = Digest.of(data)
    assert await store.get_manifest(digest) is None and not await store.has_manifest(digest)
    with pytest.raises(DigestInvalid):
        await store.put_manifest(digest, b'{"schemaVersion": 3}', "application/x")
    assert await store.blob_size(digest) is None
    await store.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    await store.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    item = await store.get_manifest(digest)
    assert item is not None and item.data == data
    assert item.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert await store.has_manifest(digest) and await store.blob_size(digest) == len(data)
    await store.put_small(D1, b"one")  # a plain object is no manifest
    assert await store.get_manifest(D1) is None and not await store.has_manifest(D1)


async def test_objects_are_read_from_their_file_a_range_or_a_url(store: RegistryStore,
                                                                 tmp_path: Path):
    data = os.urandom(100_000)
    digest = Digest.of(data)
    (tmp_path / "upload").write_bytes(data)
    await store.import_file(tmp_path / "upload", digest, len(data))
    assert await store.blob_size(digest) == len(data)
    assert await _read(store, digest) == data
    assert await _read(store, digest, 10, 20) == data[10:20]
    path = store.local_path(digest)
    assert (path is not None) == store.local
    assert (store.fill_sink(digest) is None) == store.local
    if path is not None:
        assert Path(path).read_bytes() == data  # noqa: ASYNC240
    assert await store.redirect_url(digest) is None  # (not configured here)


async def test_an_import_of_a_stored_object_keeps_it_and_refreshes_its_use(
        store: RegistryStore, tmp_path: Path):
    await store.put_small(D1, b"one")
    used = await _last_used(store, D1)
    assert used is not None
    await clock_past(used)
    (tmp_path / "again").write_bytes(b"one")
    await store.import_file(tmp_path / "again", D1, 3)
    await settled(store.driver)
    assert (await _last_used(store, D1) or 0.0) > used
    assert await _read(store, D1) == b"one"


async def test_blob_stats_and_touch(store: RegistryStore):
    await store.put_small(D1, b"one")
    await store.put_small(D2, b"two")
    stats = {s.digest: s async for s in store.blob_stats()}
    assert {d: s.size for d, s in stats.items()} == {D1: 3, D2: 3}
    assert abs(stats[D1].last_used - time.time()) < 30
    await clock_past(stats[D1].last_used)
    await store.touch_blob(D1)
    await store.touch_blob(D3)  # absent: nothing happens
    await settled(store.driver)
    assert (await _last_used(store, D1) or 0.0) > stats[D1].last_used
    assert await store.blob_size(D3) is None


async def test_delete_spares_objects_used_since_older_than(store: RegistryStore):
    data = b'{"schemaVersion": 2}'
    digest = Digest.of(data)
    await store.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    assert not await store.delete_blob(digest, older_than=time.time() - 3600)  # used since
    assert await store.blob_size(digest) == len(data)
    assert await store.delete_blob(digest, older_than=time.time() + 5)
    assert await store.blob_size(digest) is None and not await store.has_manifest(digest)
    assert not await store.delete_blob(digest)
    await store.put_small(D1, b"one")
    assert await store.delete_blob(D1)
    assert [s async for s in store.blob_stats()] == []


async def test_the_backend_answers(store: RegistryStore):
    assert await store.check() is None
    assert await store.purge_incomplete(time.time() - 3600) == 0
