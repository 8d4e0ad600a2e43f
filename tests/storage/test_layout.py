"""The on-disk layout (version 3) on both backends, the only test that knows it: what
existing data directories and buckets hold is read, what is written goes where it went,
a damaged tag reads as absent; and the upgrade's refusal when it cannot tell where bare
names belong. (The store operations the upgrade uses, renames and the layout version, are
in the store contract: tests/storage/test_store.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import UpstreamConfig
from proxy.layout import LayoutError, upgrade
from proxy.reference import Digest
from proxy.routing import Namespaces
from proxy.storage import RegistryStore, Store
from tests.support.registry import free_port

D1, D2 = Digest.of(b"one"), Digest.of(b"two")


async def test_bare_names_without_a_default_upstream_refuse_to_start(store: Store):
    await store.set_tag("library/a", "v1", D1)
    names = Namespaces({"ghcr.io": UpstreamConfig(name="ghcr.io", url="https://ghcr.io")}, None)
    with pytest.raises(LayoutError, match=r"proxy\.default_upstream"):
        await upgrade(store, names)
    assert await store.layout_version() is None  # nothing recorded: the next start retries


async def test_pushed_blobs_under_a_bare_unhosted_name_refuse_the_upgrade(store: Store):
    """Layout 1 linked blobs only to hosted repositories: a bare name holding some is hosted
    content whose pattern is missing from the config, and moving it would make it cache."""
    await store.set_tag("team/foo", "v1", D1)
    await store.link_blob("team/foo", D2)
    names = Namespaces({"docker.io": UpstreamConfig(name="docker.io", url="https://x")},
                       "docker.io")
    with pytest.raises(LayoutError, match=r"hosted\.repositories"):
        await upgrade(store, names)
    assert await store.get_tag("team/foo", "v1") == D1  # nothing moved
    assert await store.layout_version() is None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_stops_with_one_line_when_the_store_cannot_be_upgraded(tmp_path: Path, workers):
    import subprocess
    import sys

    repo = tmp_path / "data" / "repositories" / "team" / "foo"
    (repo / "_layers" / "sha256").mkdir(parents=True)
    (repo / "_layers" / "sha256" / D2.hex).touch()
    port = "0" if workers == "1" else str(free_port())  # (workers need a fixed port)
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--data-dir", str(tmp_path / "data"),
         "--listen", f"127.0.0.1:{port}", "--workers", workers],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "team/foo" in lines[0] and "hosted.repositories" in lines[0], lines


async def test_a_damaged_tag_is_absent(store: RegistryStore):
    await store.set_tag("library/a", "good", D1)
    await store.driver.put("repositories/library/a/_tags/bad", b"not a digest\n")
    assert await store.get_tag("library/a", "bad") is None
    assert await store.tag_with_age("library/a", "bad") == (None, 0.0)
    assert await store.get_tag("library/a", "good") == D1


async def test_the_keys_are_those_of_layout_3(store: RegistryStore):
    """What existing data directories and buckets hold is read, and what is written goes
    where layout 3 puts it, on every backend (docs/architecture.md, "On-disk layout")."""
    data = b'{"schemaVersion": 2}'
    m = Digest.of(data)
    shard = f"{m.hex[:2]}/{m.hex}"
    repo = "repositories/docker.io/library/a"
    layout_3 = {
        f"blobs/sha256/{shard}": data,
        f"manifests/sha256/{shard}": b"application/vnd.oci.image.manifest.v1+json",
        f"{repo}/_tags/v1": str(m).encode(),
        f"{repo}/_manifests/sha256/{m.hex}": b"",
        f"{repo}/_layers/sha256/{D1.hex}": b"",
        f"{repo}/_referrers/sha256/{D1.hex}/sha256-{m.hex}": b"",
        "layout": b"3\n",
    }
    for key, value in layout_3.items():  # as an earlier regproxy left them
        await store.driver.put(key, value)
    assert await store.layout_version() == 3
    assert await store.list_repositories() == ["docker.io/library/a"]
    assert await store.get_tag("docker.io/library/a", "v1") == m
    item = await store.get_manifest(m)
    assert item is not None and item.data == data
    assert await store.has_manifest_link("docker.io/library/a", m)
    assert await store.has_blob_link("docker.io/library/a", D1)
    assert await store.list_referrers("docker.io/library/a", D1) == [m]

    for key in await _objects(store):
        await store.driver.delete(key)
    assert await _objects(store) == []
    await store.put_manifest(m, data, "application/vnd.oci.image.manifest.v1+json")
    await store.set_tag("docker.io/library/a", "v1", m)
    await store.link_manifest("docker.io/library/a", m)
    await store.link_blob("docker.io/library/a", D1)
    await store.add_referrer("docker.io/library/a", D1, m)
    await store.set_layout_version(3)
    written = {k: await _data(store, k) for k in await _objects(store)}
    assert written == layout_3


async def _objects(store: RegistryStore) -> list[str]:
    """Every object of the store (on S3, not the driver's own ``access/`` records)."""
    keys = []
    for top in ("blobs", "manifests", "repositories"):
        keys += [k async for k, info in store.driver.walk(top) if info is not None]
    keys += [k for k in ("layout", "purged") if await store.driver.stat(k) is not None]
    return keys


async def _data(store: RegistryStore, key: str) -> bytes | None:
    got = await store.driver.get(key)
    return None if got is None else got.data
