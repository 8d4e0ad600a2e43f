"""Referrers of cached repositories (issue 19, item 4): ``GET /v2/<name>/referrers/<digest>``
asks the upstream. Against the real docker-registry (distribution 2.8 has no referrers API,
so the proxy falls back to the ``sha256-<hex>`` referrers schema tag), with artifacts the
test pushes through the V2 API; against the fake upstream for a registry that serves the
API, for the cache's TTL, for a lying list, and for an outage (the last answer, stale)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import create_app
from proxy.config import from_dict
from tests.support.artifacts import (
    OCI_INDEX,
    add_built,
    artifact,
    cosign_signature,
    push_built,
    schema_index,
    sig_tag,
    signing_key,
)
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import make_tar_layer, push_image
from tests.support.proxyfix import make_config
from tests.support.registry import RegistryProcess
from tests.support.store import is_manifest_stored

UP = "upstream.test"
SBOM = "application/spdx+json"
VEX = "application/vnd.openvex+json"


async def serve(aiohttp_server: Any, cfg: Any) -> str:
    server = await aiohttp_server(create_app(cfg))
    return str(server.make_url("")).rstrip("/")


async def referrers(session: aiohttp.ClientSession, base: str, repo: str, digest: str,
                    artifact_type: str | None = None) -> tuple[list[dict[str, Any]], aiohttp.ClientResponse]:
    params = {"artifactType": artifact_type} if artifact_type is not None else {}
    async with session.get(f"{base}/v2/{repo}/referrers/{digest}", params=params) as r:
        body = await r.read()
        assert r.status == 200, body
        assert r.headers["Content-Type"] == OCI_INDEX
        doc = json.loads(body)
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    return doc["manifests"], r


# -- the real upstream: the referrers tag schema ------------------------------------------


async def test_tag_schema_fallback_lists_verified_referrers_pulled_through(
        upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession,
        aiohttp_server: Any, tmp_path: Path) -> None:
    reg = upstream_registry
    repo = f"referrers/app-{uuid.uuid4().hex[:8]}"
    image = await push_image(http_session, reg.url, repo, "1.0", [make_tar_layer(seed=1941)],
                             schema="oci")
    sbom = artifact(image.digest, len(image.manifest), SBOM, b'{"spdxVersion":"SPDX-2.3"}',
                    annotations={"org.opencontainers.image.created": "2026-12-02T00:00:00Z"})
    await push_built(http_session, reg.url, repo, sbom)
    # listed by the schema tag, but its subject is another manifest: left out
    stray = artifact("sha256:" + "0" * 64, 10, VEX, b'{"stray":true}')
    await push_built(http_session, reg.url, repo, stray)
    key, _ = signing_key()
    sig = cosign_signature(key, image.digest, f"{UP}/{repo}")
    await push_built(http_session, reg.url, repo, sig, tag=sig_tag(image.digest))
    index = schema_index([sbom.descriptor(), stray.descriptor()])
    await push_built(http_session, reg.url, repo, index, tag=image.digest.replace(":", "-"))

    data = tmp_path / "data"
    base = await serve(aiohttp_server, from_dict({
        "storage": {"root": str(data)}, "proxy": {"default_upstream": UP},
        "upstreams": {UP: {"url": reg.url, "proxy": ""}}}))

    listed, resp = await referrers(http_session, base, repo, image.digest)
    assert listed == [{"mediaType": sbom.media_type, "digest": sbom.digest,
                       "size": len(sbom.manifest), "artifactType": SBOM,
                       "annotations": {"org.opencontainers.image.created": "2026-12-02T00:00:00Z"}}]
    assert "OCI-Filters-Applied" not in resp.headers
    only, resp = await referrers(http_session, base, repo, image.digest, SBOM)
    assert only == listed and resp.headers["OCI-Filters-Applied"] == "artifactType"
    none, resp = await referrers(http_session, base, repo, image.digest, VEX)
    assert none == [] and resp.headers["OCI-Filters-Applied"] == "artifactType"

    # the referrer was pulled through: stored, linked, served by digest, its blobs too
    assert await is_manifest_stored(data, sbom.digest)
    async with http_session.get(f"{base}/v2/{repo}/manifests/{sbom.digest}",
                                headers={"Accept": sbom.media_type}) as r:
        assert r.status == 200 and await r.read() == sbom.manifest
    layer = json.loads(sbom.manifest)["layers"][0]["digest"]
    async with http_session.get(f"{base}/v2/{repo}/blobs/{layer}") as r:
        assert r.status == 200 and await r.read() == sbom.blobs[1]

    # cosign's tag-based signature is still a tag
    async with http_session.get(f"{base}/v2/{repo}/manifests/{sig_tag(image.digest)}",
                                headers={"Accept": sig.media_type}) as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == sig.digest

    # a digest with no referrers schema tag: an empty list, not an error
    assert (await referrers(http_session, base, repo, sbom.digest))[0] == []


# -- the fake upstream: a referrers API, the TTL, lies, outages ----------------------------


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream(referrers_api=True)


def image_with_referrers(fake: FakeUpstream) -> tuple[str, dict[str, str]]:
    """``app:1`` with an SBOM and a VEX document attached: (its digest, type -> digest)."""
    digest = fake.add_image("app", "1", [b"layer of app 1"])
    size = len(fake.manifests[("app", digest)][0])
    attached = {art: add_built(fake, "app", artifact(digest, size, art, art.encode()))
                for art in (SBOM, VEX)}
    return digest, attached


async def test_referrers_api_answer_is_pulled_through_and_kept_for_the_ttl(
        fake: FakeUpstream, upstream_url: str, aiohttp_server: Any, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    digest, attached = image_with_referrers(fake)
    # the upstream also lists a manifest it does not serve, and one that refers elsewhere
    elsewhere = add_built(fake, "app", artifact("sha256:" + "1" * 64, 5, SBOM, b"elsewhere"))
    fake.extra_referrers = [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "2" * 64,
         "size": 10, "artifactType": SBOM},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": elsewhere,
         "size": len(fake.manifests[("app", elsewhere)][0]), "artifactType": SBOM}]
    data = tmp_path / "data"
    base = await serve(aiohttp_server, make_config(data, {"fake.io": upstream_url}, tag_ttl=300))

    listed, _ = await referrers(client, base, "app", digest)
    assert {e["digest"]: e["artifactType"] for e in listed} == {d: a for a, d in attached.items()}
    for entry in listed:
        assert entry["size"] == len(fake.manifests[("app", entry["digest"])][0])
        assert await is_manifest_stored(data, entry["digest"])
    assert fake.count("GET", f"/v2/app/referrers/{digest}") == 1
    assert fake.count("GET", "/manifests/sha256-") == 0  # the API answered: no schema tag

    vex, resp = await referrers(client, base, "app", digest, VEX)
    assert [e["digest"] for e in vex] == [attached[VEX]]
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert fake.count("GET", f"/v2/app/referrers/{digest}") == 1  # within the TTL: cached
    fetched = fake.count("GET", "/manifests/")
    async with client.get(f"{base}/v2/app/manifests/{attached[SBOM]}") as r:
        assert r.status == 200  # linked by the listing: no upstream request
    assert fake.count("GET", "/manifests/") == fetched


async def test_last_referrers_answer_is_served_stale_in_an_outage(
        fake: FakeUpstream, upstream_url: str, aiohttp_server: Any, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    digest, attached = image_with_referrers(fake)
    other = fake.add_image("app", "2", [b"layer of app 2"])
    data = tmp_path / "data"
    cfg = make_config(data, {"fake.io": upstream_url}, tag_ttl=0)  # always ask the upstream
    base = await serve(aiohttp_server, cfg)
    listed, _ = await referrers(client, base, "app", digest)
    assert len(listed) == 2

    fake.status = 503
    asked = fake.count("GET", "/referrers/")
    stale, _ = await referrers(client, base, "app", digest)
    assert stale == listed
    assert fake.count("GET", "/referrers/") == asked + 1  # asked, failed, answered stale
    # a restarted proxy has the store's record
    restarted = await serve(aiohttp_server, cfg)
    assert (await referrers(client, restarted, "app", digest))[0] == listed
    # never listed: the outage is an error, not an empty list
    async with client.get(f"{base}/v2/app/referrers/{other}") as r:
        assert r.status == 503

    fake.status = None  # back: a referrer gone upstream leaves the list
    del fake.manifests[("app", attached[VEX])]
    after, _ = await referrers(client, base, "app", digest)
    assert [e["digest"] for e in after] == [attached[SBOM]]
