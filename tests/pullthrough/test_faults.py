"""Pull-through behaviour against an in-process fake upstream that misbehaves on demand."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import aiohttp
import pytest
from yarl import URL

from proxy.app import create_app
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.proxyfix import make_config, serve_app, with_upstream_fields
from tests.support.store import (
    blob_path,
    is_stored,
    stored_tag,
    tmp_files,
    wait_stored,
    wait_until,
)

MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def proxy(aiohttp_server, upstream_url, tmp_path):
    """(base URL, data dir) of a proxy whose default upstream is the fake."""
    data = tmp_path / "data"
    return await serve_app(aiohttp_server,
                           create_app(make_config(data, {"fake.io": upstream_url}))), data


# -- blobs -------------------------------------------------------------------------------


async def test_blob_miss_is_streamed_cached_and_then_served_locally(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(3 * MiB + 17)
    d = fake.add_blob(blob)
    async with client.get(f"{base}/v2/team/app/blobs/{d}") as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == d
        assert await r.read() == blob
    await wait_stored(data, d)
    async with client.get(f"{base}/v2/other/repo/blobs/{d}") as r:  # dedup across repos
        assert r.status == 200 and await r.read() == blob
    assert fake.count("GET", f"/blobs/{d}") == 1
    await wait_until(lambda: tmp_files(data) == [], "the fill's temp and hint files to go")


async def test_twenty_concurrent_clients_cause_one_upstream_transfer(fake, proxy, client):
    base, data = proxy
    fake.chunk_delay = 0.002  # keep the fill running while clients pile up
    blob = os.urandom(4 * MiB)
    d = fake.add_blob(blob)

    async def pull(i: int) -> bytes:
        async with client.get(f"{base}/v2/repo{i % 3}/blobs/{d}") as r:
            assert r.status == 200
            return await r.read()

    bodies = await asyncio.gather(*(pull(i) for i in range(20)))
    assert all(b == blob for b in bodies)
    assert fake.count("GET", f"/blobs/{d}") == 1
    await wait_stored(data, d)


async def test_slow_clients_of_a_fill_get_every_byte_in_order(fake, proxy):
    """Fills are sent with sendfile while the client's socket has room and through the
    transport when it is full: clients reading slowly through small receive buffers (the
    socket fills again and again) still get the exact blob, in order."""
    base, _ = proxy
    fake.chunk_delay = 0.0005
    blob = os.urandom(6 * MiB + 123)
    d = fake.add_blob(blob)
    url = URL(base)

    async def slow_pull(repo: str) -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        writer.write(f"GET /v2/{repo}/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and f"{len(blob)}".encode() in head
        body = bytearray()
        while len(body) < len(blob):
            body += await reader.read(32 << 10)
            await asyncio.sleep(0.002)  # slower than the fill: the socket stays full
        writer.close()
        return bytes(body)

    bodies = await asyncio.gather(*(slow_pull(f"slow{i}") for i in range(4)))
    assert all(b == blob for b in bodies)
    assert fake.count("GET", f"/blobs/{d}") == 1


@pytest.mark.parametrize("size", [300 * 1024, 12 * MiB + 5])
async def test_a_blob_sent_chunked_without_a_length_is_verified_and_cached(fake, proxy, client,
                                                                         size):
    """No Content-Length upstream (chunked): the end of the body is the end of the blob,
    for the inline path (small) and the threaded one (big, several batches)."""
    base, data = proxy
    fake.chunked_blobs = True
    blob = os.urandom(size)
    d = fake.add_blob(blob)
    async with client.get(f"{base}/v2/chunky/blobs/{d}") as r:
        assert r.status == 200
        assert await r.read() == blob
    await wait_stored(data, d)
    async with client.get(f"{base}/v2/chunky/blobs/{d}") as r:  # from the cache now
        assert await r.read() == blob
    assert fake.count("GET", f"/blobs/{d}") == 1


async def test_joiner_receives_bytes_before_the_fill_ends(fake, proxy, client):
    base, _ = proxy
    fake.chunk_delay = 0.01  # 64 KiB every 10 ms: 2 MiB take ~0.3 s
    blob = os.urandom(2 * MiB)
    d = fake.add_blob(blob)
    first = await client.get(f"{base}/v2/a/blobs/{d}")
    await first.content.readexactly(256 * 1024)
    second = await client.get(f"{base}/v2/b/blobs/{d}")
    await second.content.readexactly(1)
    # the joiner has bytes while the upstream is still sending: it tails the fill
    assert d not in fake.sent_all
    rest_first = await first.read()
    rest_second = await second.read()
    assert rest_second and len(rest_second) + 1 == len(blob)
    assert len(rest_first) + 256 * 1024 == len(blob)
    assert fake.count("GET", f"/blobs/{d}") == 1
    first.release()
    second.release()


async def test_bytes_received_before_an_upstream_stall_reach_the_client(fake, proxy, client):
    """A big blob (written by the fill's thread) stalls upstream after 10 MiB: the client
    gets all 10 MiB while the upstream is still silent, not after it resumes."""
    base, _ = proxy
    blob = os.urandom(12 * MiB)
    d = fake.add_blob(blob)
    fake.stall_after = 10 * MiB
    try:
        async with client.get(f"{base}/v2/a/blobs/{d}") as r:
            head = await asyncio.wait_for(r.content.readexactly(10 * MiB), 10)
            assert d not in fake.sent_all  # the upstream is still silent
            fake.resume.set()
            assert head + await r.read() == blob
    finally:
        fake.resume.set()


async def test_fill_continues_after_the_client_disconnects(fake, proxy, client):
    base, data = proxy
    fake.chunk_delay = 0.005
    blob = os.urandom(2 * MiB)
    d = fake.add_blob(blob)
    r = await client.get(f"{base}/v2/a/blobs/{d}")
    await r.content.readexactly(64 * 1024)
    r.close()  # hang up mid-transfer
    await wait_stored(data, d)
    assert blob_path(data, d).read_bytes() == blob
    assert fake.count("GET", f"/blobs/{d}") == 1


async def test_upstream_dying_mid_blob_aborts_the_client_and_caches_nothing(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(2 * MiB)
    d = fake.add_blob(blob)
    fake.die_after = MiB
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/v2/a/blobs/{d}") as r:
            assert r.status == 200
            await r.read()
    await wait_until(lambda: tmp_files(data) == [], "the fill's temp and hint files to go")
    assert not is_stored(data, d)
    fake.die_after = None  # the upstream recovers: the next pull fills the cache
    async with client.get(f"{base}/v2/a/blobs/{d}") as r:
        assert await r.read() == blob
    await wait_stored(data, d)


async def test_upstream_lying_about_a_digest_is_never_cached(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(300_000)
    d = fake.add_blob(blob)
    fake.corrupt = True
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/v2/a/blobs/{d}") as r:
            await r.read()
    await wait_until(lambda: tmp_files(data) == [], "the fill's temp and hint files to go")
    assert not is_stored(data, d)


async def test_range_requests_on_a_filling_and_on_a_cached_blob(fake, proxy, client):
    base, _ = proxy
    fake.chunk_delay = 0.003
    blob = os.urandom(2 * MiB)
    d = fake.add_blob(blob)
    url = f"{base}/v2/a/blobs/{d}"
    ranges = [(0, 99), (MiB, MiB + 4095), (2 * MiB - 10, 2 * MiB - 1)]

    async def fetch(lo: int, hi: int) -> tuple[int, str, bytes]:
        async with client.get(url, headers={"Range": f"bytes={lo}-{hi}"}) as r:
            return r.status, r.headers.get("Content-Range", ""), await r.read()

    while_filling = await asyncio.gather(*(fetch(lo, hi) for lo, hi in ranges))
    cached = await asyncio.gather(*(fetch(lo, hi) for lo, hi in ranges))
    for (lo, hi), got in zip(ranges * 2, while_filling + cached, strict=True):
        assert got == (206, f"bytes {lo}-{hi}/{len(blob)}", blob[lo:hi + 1])
    async with client.get(url, headers={"Range": f"bytes={len(blob)}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{len(blob)}"
    assert fake.count("GET", f"/blobs/{d}") == 1


async def test_head_on_an_uncached_blob_never_downloads_it(fake, proxy, client):
    base, data = proxy
    blob = os.urandom(100_000)
    d = fake.add_blob(blob)
    async with client.head(f"{base}/v2/a/blobs/{d}") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(blob))
        assert r.headers["Docker-Content-Digest"] == d
    assert fake.count("HEAD", f"/blobs/{d}") == 1
    assert fake.count("GET", f"/blobs/{d}") == 0
    assert not is_stored(data, d)
    missing = digest_of(b"nope")
    async with client.head(f"{base}/v2/a/blobs/{missing}") as r:
        assert r.status == 404


async def test_unknown_blob_is_a_fast_oci_404(fake, proxy, client):
    base, _ = proxy
    async with client.get(f"{base}/v2/a/blobs/{digest_of(b'absent')}") as r:
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


# -- manifests -----------------------------------------------------------------------------


async def test_manifest_by_tag_then_digest_byte_for_byte(fake, proxy, client):
    base, _data = proxy
    d = fake.add_image("team/app", "v1", [b"layer-one"], media_type=DOCKER_MANIFEST)
    body, _ = fake.manifests[("team/app", "v1")]
    for ref in ("v1", d):
        async with client.get(f"{base}/v2/team/app/manifests/{ref}",
                              headers={"Accept": DOCKER_MANIFEST}) as r:
            assert r.status == 200
            assert await r.read() == body
            assert r.headers["Content-Type"] == DOCKER_MANIFEST
            assert r.headers["Docker-Content-Digest"] == d
            assert r.headers["ETag"] == f'"{d}"'
            assert r.headers["Content-Length"] == str(len(body))
    assert fake.count("GET", "/manifests/") == 1
    async with client.get(f"{base}/v2/team/app/manifests/{d}",
                          headers={"If-None-Match": f'"{d}"'}) as r:
        assert r.status == 304


async def test_head_by_tag_uses_upstream_head_and_keeps_an_index(fake, proxy, client):
    base, _ = proxy
    child = fake.add_image("multi", "child", [b"amd64-layer"])
    child_body, _ = fake.manifests[("multi", "child")]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child, "size": len(child_body),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    index_digest = fake.add_manifest("multi", "latest", index, OCI_INDEX)
    single = fake.add_image("single", "latest", [b"x"])
    async with client.head(f"{base}/v2/single/manifests/latest") as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == single
        assert int(r.headers["Content-Length"]) > 0
    assert fake.count("GET", "/single/manifests/") == 0  # HEAD stays a HEAD upstream
    async with client.head(f"{base}/v2/multi/manifests/latest") as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == index_digest
    assert fake.count("GET", f"/multi/manifests/{index_digest}") == 1  # the index is kept
    fake.status = 503  # upstream down: the index is still served by digest
    async with client.get(f"{base}/v2/multi/manifests/{index_digest}",
                          headers={"Accept": OCI_INDEX}) as r:
        assert r.status == 200 and await r.read() == index


async def test_client_without_index_support_gets_the_platform_child(fake, proxy, client):
    base, _ = proxy
    child = fake.add_image("multi", "child", [b"amd64-layer"], media_type=DOCKER_MANIFEST)
    child_body, _ = fake.manifests[("multi", "child")]
    lst = "application/vnd.docker.distribution.manifest.list.v2+json"
    index = json.dumps({"schemaVersion": 2, "mediaType": lst, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": child, "size": len(child_body),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    fake.add_manifest("multi", "latest", index, lst)
    async with client.get(f"{base}/v2/multi/manifests/latest",
                          headers={"Accept": DOCKER_MANIFEST}) as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == child
        assert await r.read() == child_body
    async with client.get(f"{base}/v2/multi/manifests/latest",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
        assert r.status == 404  # neither the list nor its child is acceptable
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_tags_are_revalidated_with_head_after_the_ttl(aiohttp_server, fake, upstream_url,
                                                            tmp_path, client):
    cfg = make_config(tmp_path / "d", {"fake.io": upstream_url}, tag_ttl=0.2,
                      tag_stale_while_revalidate=0.0)  # every request after the TTL waits
    base = await serve_app(aiohttp_server, create_app(cfg))
    d1 = fake.add_image("app", "latest", [b"one"])
    url = f"{base}/v2/app/manifests/latest"
    async with client.get(url) as r:
        assert r.headers["Docker-Content-Digest"] == d1
    async with client.get(url) as r:  # within the TTL: no upstream request at all
        assert r.headers["Docker-Content-Digest"] == d1
    assert len([x for x in fake.requests if "/manifests/" in x.path]) == 1
    await asyncio.sleep(0.3)
    async with client.get(url) as r:  # expired, unchanged: one HEAD, no GET
        assert r.headers["Docker-Content-Digest"] == d1
    assert fake.count("HEAD", "/app/manifests/latest") == 1
    assert fake.count("GET", "/app/manifests/") == 1
    d2 = fake.add_image("app", "latest", [b"two"])  # the tag moves upstream
    await asyncio.sleep(0.3)
    async with client.get(url) as r:
        assert r.headers["Docker-Content-Digest"] == d2
    assert fake.count("GET", f"/app/manifests/{d2}") == 1


async def test_a_tag_just_past_its_ttl_is_answered_at_once_and_revalidated_behind(
        aiohttp_server, fake, upstream_url, tmp_path, client):
    """stale-while-revalidate: within the grace after the TTL the client does not wait for
    the upstream; one background HEAD (and GET, as the tag moved) brings the new digest;
    past the grace the request waits for the revalidation again."""
    cfg = make_config(tmp_path / "d", {"fake.io": upstream_url}, tag_ttl=0.3,
                      tag_stale_while_revalidate=0.6)
    base = await serve_app(aiohttp_server, create_app(cfg))
    d1 = fake.add_image("app", "latest", [b"one"])
    url = f"{base}/v2/app/manifests/latest"
    async with client.get(url) as r:
        assert r.headers["Docker-Content-Digest"] == d1
    d2 = fake.add_image("app", "latest", [b"two"])  # the tag moves upstream
    fake.manifest_delay = 0.5  # a slow upstream: a request that waited for it would take 0.5 s+
    await asyncio.sleep(0.35)  # expired, within the grace
    started = time.monotonic()
    for _ in range(5):  # five clients at once: all answered from the cache, one HEAD
        async with client.get(url) as r:
            assert r.status == 200 and r.headers["Docker-Content-Digest"] == d1
    assert time.monotonic() - started < 0.4
    await asyncio.sleep(1.2)  # the background revalidation (HEAD + GET of d2) is done
    assert fake.count("HEAD", "/app/manifests/latest") == 1
    assert fake.count("GET", f"/app/manifests/{d2}") == 1
    fake.manifest_delay = 0.0
    async with client.get(url) as r:  # fresh again, from the cache
        assert r.headers["Docker-Content-Digest"] == d2
    assert fake.count("HEAD", "/app/manifests/latest") == 1
    fake.add_image("app", "latest", [b"three"])
    await asyncio.sleep(1.0)  # past TTL + grace: this request waits for the revalidation
    async with client.get(url) as r:
        assert r.headers["Docker-Content-Digest"] != d2
    assert fake.count("HEAD", "/app/manifests/latest") == 2


@pytest.mark.parametrize("status", [503, 429, 404, 500])
async def test_last_known_tag_is_served_when_the_upstream_fails(aiohttp_server, fake, upstream_url,
                                                                tmp_path, client, status):
    cfg = make_config(tmp_path / "d", {"fake.io": upstream_url}, tag_ttl=0)
    base = await serve_app(aiohttp_server, create_app(cfg))
    d = fake.add_image("app", "stable", [b"content"])
    async with client.get(f"{base}/v2/app/manifests/stable") as r:
        assert r.status == 200
    fake.status = status
    if status == 404:
        fake.status = None
        del fake.manifests[("app", "stable")]
    requests_before = len(fake.requests)
    async with client.get(f"{base}/v2/app/manifests/stable") as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == d
    assert len(fake.requests) > requests_before  # the upstream was asked, and failed
    assert await stored_tag(tmp_path / "d", "fake.io/app", "stable") == d


async def test_uncached_content_during_an_outage_is_a_fast_error(fake, proxy, client):
    base, _ = proxy
    fake.status = 429
    async with client.get(f"{base}/v2/app/manifests/new") as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "7"
        assert (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    fake.status = 502
    async with client.get(f"{base}/v2/app/manifests/new") as r:
        assert r.status == 503
        assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_circuit_breaker_makes_an_outage_cost_one_timeout(aiohttp_server, tmp_path, client):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connections are refused
    cfg = make_config(tmp_path / "d", {"down.io": f"http://127.0.0.1:{port}"})
    base = await serve_app(aiohttp_server, create_app(cfg))
    for _ in range(3):
        async with client.get(f"{base}/v2/app/manifests/x") as r:
            assert r.status == 503
    async with client.get(f"{base}/v2/app/manifests/x") as r:
        assert r.status == 503
        assert "circuit open" in (await r.json())["errors"][0]["message"]


async def test_manifest_with_a_wrong_digest_is_refused(fake, proxy, client):
    base, data = proxy
    good = b'{"schemaVersion":2,"mediaType":"%s","config":{},"layers":[]}' % OCI_MANIFEST.encode()
    d = digest_of(good)
    fake.manifests[("app", d)] = (good + b" ", OCI_MANIFEST)  # bytes do not match the digest
    async with client.get(f"{base}/v2/app/manifests/{d}") as r:
        # a 404 like every object the upstream does not vouch for (the log says it lied)
        assert r.status == 404 and "does not match" in (await r.json())["errors"][0]["message"]
    assert not (data / "manifests" / "sha256" / d[7:9] / d[7:]).exists()


# -- auth and redirects --------------------------------------------------------------------


async def test_bearer_token_flow_and_redirects_without_credentials(aiohttp_server, fake, tmp_path,
                                                                   client):
    cdn = FakeUpstream()
    fake.require_token = "s3cret-token"
    fake.redirect_to = await serve_app(aiohttp_server, cdn.app())
    cfg = make_config(tmp_path / "d", {"fake.io": await serve_app(aiohttp_server, fake.app())})
    base = await serve_app(aiohttp_server, create_app(cfg))
    blobs = [os.urandom(1000 + i) for i in range(3)]
    d = fake.add_image("app", "v1", blobs)
    for b in blobs:
        cdn.add_blob(b)
    async with client.get(f"{base}/v2/app/manifests/v1") as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == d
        manifest = await r.json()
    for layer in manifest["layers"]:
        async with client.get(f"{base}/v2/app/blobs/{layer['digest']}") as r:
            assert r.status == 200
            assert digest_of(await r.read()) == layer["digest"]
    assert fake.token_requests == 1  # one token per scope, reused
    assert cdn.requests and all("Authorization" not in x.headers for x in cdn.requests)
    assert all(x.headers.get("Authorization") == "Bearer s3cret-token"
               for x in fake.requests if "/blobs/" in x.path)


@pytest.mark.parametrize("with_credentials", [True, False])
async def test_basic_auth_upstream_gets_its_configured_credentials(aiohttp_server, fake, tmp_path,
                                                                   client, with_credentials):
    fake.require_basic = "robot:s3cret"
    up = await serve_app(aiohttp_server, fake.app())
    cfg = make_config(tmp_path / "d", {"basic.io": up})
    if with_credentials:
        cfg = with_upstream_fields(cfg, username="robot", password="s3cret")
    base = await serve_app(aiohttp_server, create_app(cfg))
    d = fake.add_image("private/app", "v1", [b"secret layer"])
    async with client.get(f"{base}/v2/private/app/manifests/v1") as r:
        if with_credentials:
            assert r.status == 200 and r.headers["Docker-Content-Digest"] == d
            assert "s3cret" not in str(r.headers) and "Basic" not in str(r.headers)
        else:  # the upstream refuses us: a 404 so clients fall back, never a 401 loop
            assert r.status == 404
            assert "denied" in (await r.json())["errors"][0]["message"]


# -- routing -------------------------------------------------------------------------------


async def test_ns_and_path_prefix_route_to_one_cache_key(aiohttp_server, tmp_path, client):
    hub, ghcr = FakeUpstream(), FakeUpstream()
    hub_url = await serve_app(aiohttp_server, hub.app())
    ghcr_url = await serve_app(aiohttp_server, ghcr.app())
    cfg = make_config(tmp_path / "d", {"docker.io": hub_url, "ghcr.io": ghcr_url})
    base = await serve_app(aiohttp_server, create_app(cfg))
    hub_digest = hub.add_image("library/alpine", "3", [b"hub"])
    ghcr_digest = ghcr.add_image("org/tool", "1", [b"ghcr"])
    for url in (f"{base}/v2/alpine/manifests/3", f"{base}/v2/library/alpine/manifests/3?ns=docker.io",
                f"{base}/v2/alpine/manifests/3?ns=docker.io",
                f"{base}/v2/docker.io/library/alpine/manifests/3",
                f"{base}/docker.io/v2/alpine/manifests/3"):  # Engine 25+ mirror with a path
        async with client.get(url) as r:
            assert r.status == 200, url
            assert r.headers["Docker-Content-Digest"] == hub_digest
    for url in (f"{base}/v2/org/tool/manifests/1?ns=ghcr.io", f"{base}/v2/ghcr.io/org/tool/manifests/1",
                f"{base}/ghcr.io/v2/org/tool/manifests/1"):
        async with client.get(url) as r:
            assert r.status == 200, url
            assert r.headers["Docker-Content-Digest"] == ghcr_digest
    assert hub.count("GET", "/manifests/") == 1  # one cache entry whatever the spelling
    assert ghcr.count("GET", "/manifests/") == 1
    for url in (f"{base}/v2/org/tool/manifests/1?ns=quay.io", f"{base}/quay.io/v2/org/tool/manifests/1"):
        async with client.get(url) as r:
            assert r.status == 404 and (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    async with client.get(f"{base}/docker.io/v2/") as r:
        assert r.status == 200
    async with client.get(f"{base}/v2/_catalog") as r:
        assert (await r.json())["repositories"] == ["ghcr.io/org/tool", "library/alpine"]


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/Upper/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a/../b/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a%2F..%2Fb/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/a/manifests/bad!tag", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/md5:0123", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/latest", 400, "DIGEST_INVALID"),
        ("PUT", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/a/blobs/sha256:{'0' * 64}", 405, "UNSUPPORTED"),
        ("POST", "/v2/a/blobs/uploads/", 405, "UNSUPPORTED"),
        ("GET", "/v2/a/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/a/nothing/here", 404, "NOT_FOUND"),
    ],
)
async def test_bad_requests_get_oci_errors(proxy, client, method, path, status, code):
    base, _ = proxy
    async with client.request(method, URL(base + path, encoded=True)) as r:
        assert r.status == status
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert (await r.json())["errors"][0]["code"] == code


async def test_version_check(proxy, client):
    base, _ = proxy
    async with client.get(f"{base}/v2/") as r:
        assert r.status == 200
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_tags_list_from_upstream_and_catalog_pagination(fake, proxy, client):
    base, _ = proxy
    for i in range(5):
        fake.add_image(f"repo{i}", f"t{i}", [b"x%d" % i])
        fake.add_image("repo0", f"extra{i}", [b"y%d" % i])
    async with client.get(f"{base}/v2/repo0/tags/list") as r:
        assert (await r.json())["tags"] == sorted(["t0"] + [f"extra{i}" for i in range(5)])
    for i in range(5):
        async with client.get(f"{base}/v2/repo{i}/manifests/t{i}") as r:
            assert r.status == 200
    async with client.get(f"{base}/v2/_catalog?n=2") as r:
        assert (await r.json())["repositories"] == ["repo0", "repo1"]
        assert r.headers["Link"] == '</v2/_catalog?n=2&last=repo1>; rel="next"'
    async with client.get(f"{base}/v2/_catalog?n=2&last=repo3") as r:
        assert (await r.json())["repositories"] == ["repo4"]
        assert "Link" not in r.headers
    fake.status = 503  # tags of a cached repository survive an outage
    async with client.get(f"{base}/v2/repo2/tags/list") as r:
        assert (await r.json()) == {"name": "repo2", "tags": ["t2"]}


async def test_an_unexpected_error_mid_stream_cuts_the_connection(fake, proxy, client,
                                                                  monkeypatch):
    """A bug after the headers went out must not leave the client waiting for bytes."""
    from proxy.pullthrough.fill import FillReader

    original = FillReader.spans  # (plain HTTP: the handler sends the fill file's spans)

    async def broken(self, start=0, end=None):
        async for span in original(self, start, end):
            yield span
            raise RuntimeError("injected bug")

    monkeypatch.setattr(FillReader, "spans", broken)
    base, _ = proxy
    fake.chunk_delay = 0.002
    d = fake.add_blob(os.urandom(2 * MiB))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/v2/a/blobs/{d}",
                              timeout=aiohttp.ClientTimeout(total=10)) as r:
            await r.read()
