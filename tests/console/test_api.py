"""The console's JSON API (docs/console.md) against a real upstream docker-registry, with
real pulls through the proxy: the shapes of its answers, the figures they carry, and who
may read them (the ``ops`` right, as the status pages)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import aiohttp

from proxy.app import create_app
from proxy.server import runner_kwargs
from proxy.settings.auth import parse_auth
from proxy.timeseries import WINDOWS, TimeSeries, make_row
from tests.console.traffic import Traffic, auth_table, basic, console_config, make_traffic

API = "/_regproxy/api"


async def console_with_users(upstream_registry, http_session, aiohttp_server,
                             tmp_path) -> tuple[str, Traffic]:
    """A proxy with the console and the users of ``auth_table`` (so rights can be tried),
    and traffic through it pulled as ``admin``: its base URL and what was pulled."""
    cfg = console_config(tmp_path, upstream_registry.url,
                         auth=parse_auth(auth_table(tmp_path), tmp_path))
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    return base, await make_traffic(http_session, upstream_registry.url, base, tmp_path,
                                    headers=basic("admin"))


async def get_json(client: aiohttp.ClientSession, url: str, **kw: object) -> dict:
    async with client.get(url, **kw) as r:
        assert r.status == 200, (url, r.status, await r.text())
        assert r.headers["Cache-Control"] == "no-store"
        return await r.json()


async def post_expect(client: aiohttp.ClientSession, url: str, status: int,
                      code: str | None = None, **kw: Any) -> None:
    """POST an action that must be refused (or whose answer the test does not read): its
    status, and the OCI error code when one is named."""
    async with client.post(url, **kw) as r:
        assert r.status == status, (url, kw, await r.text())
        if code is not None:
            assert (await r.json())["errors"][0]["code"] == code


async def test_api_answers_with_the_traffic_it_served(upstream_registry, http_session,
                                                      aiohttp_server, tmp_path):
    cfg = console_config(tmp_path, upstream_registry.url)
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    traffic = await make_traffic(http_session, upstream_registry.url, base, tmp_path)

    overview = await get_json(http_session, f"{base}{API}/overview?window=15m")
    series = overview["series"]
    step, keep = WINDOWS["15m"]
    assert overview["step_seconds"] == step and len(series["time"]) == keep
    assert all(b - a == step for a, b in zip(series["time"], series["time"][1:], strict=False))
    for column in ("requests_per_second", "hit_ratio", "bytes_cache", "bytes_upstream",
                   "upstream_bytes", "p50_ms", "p99_ms"):
        assert len(series[column]) == keep, column
    totals = overview["totals"]
    assert totals["requests"] >= traffic.requests
    assert totals["hits"] >= 1 and totals["misses"] >= 1 and 0 < totals["hit_ratio"] < 1
    assert totals["bytes_cache"] >= traffic.layer_size  # the second pull of the big layer
    assert totals["bytes_upstream"] >= traffic.layer_size  # its first
    assert totals["upstream_bytes"] >= traffic.layer_size
    assert totals["p50_ms"] is not None and totals["p99_ms"] >= totals["p50_ms"]
    assert any(v for v in series["requests_per_second"])
    assert overview["workers"] and overview["workers"][0]["pid"]
    for window in WINDOWS:
        assert (await get_json(http_session, f"{base}{API}/overview?window={window}"))[
            "totals"]["requests"] >= traffic.requests
    async with http_session.get(f"{base}{API}/overview?window=1y") as r:
        assert r.status == 400 and (await r.json())["errors"][0]["code"] == "UNSUPPORTED"

    ups = {u["name"]: u for u in (await get_json(http_session, f"{base}{API}/upstreams"))["upstreams"]}
    reg = ups["reg.io"]
    assert reg["state"] == "healthy" and reg["contacted"] and reg["default"]
    assert reg["last_success"] is not None and reg["breaker"] == "closed"
    assert sum(reg["requests_by_status"].values()) >= 2
    never = ups["never.io"]  # configured, never asked: not "healthy"
    assert never["state"] == "never_contacted" and not never["contacted"]
    assert never["last_success"] is None and never["last_failure"] is None
    assert "@" not in never["url"] and "secret" not in json.dumps(ups)
    lat = reg["latency"]
    assert len(lat["time"]) == len(lat["p50_ms"]) == len(lat["p99_ms"]) == keep
    assert lat["requests"] >= 2 and 0 < lat["p50"] <= lat["p99"]
    assert any(v is not None for v in lat["p50_ms"])
    assert never["latency"]["requests"] == 0 and never["latency"]["p50"] is None
    assert reg["auth"] == {"scheme": None, "token_fetched_at": None, "token_expires_at": None,
                           "token_scope": None}  # (the test registry asks for no auth)
    ups6h = (await get_json(http_session, f"{base}{API}/upstreams?window=6h"))["upstreams"]
    assert len(ups6h[0]["latency"]["time"]) == WINDOWS["6h"][1]
    async with http_session.get(f"{base}{API}/upstreams?window=1y") as r:
        assert r.status == 400

    repos = (await get_json(http_session, f"{base}{API}/repositories"))["repositories"]
    by_name = {r["name"]: r for r in repos}
    assert by_name[traffic.repo]["kind"] == "cached" and by_name[traffic.repo]["upstream"] == "reg.io"
    assert by_name[traffic.hosted]["kind"] == "hosted" and by_name[traffic.hosted]["upstream"] is None
    assert [r["name"] for r in repos] == sorted(r["name"] for r in repos)
    found = (await get_json(http_session, f"{base}{API}/repositories?q=APP"))["repositories"]
    assert [r["name"] for r in found] == [traffic.hosted]
    assert by_name[traffic.repo]["served_bytes"] >= 2 * traffic.layer_size
    by_served = (await get_json(http_session, f"{base}{API}/repositories?sort=served"))["repositories"]
    assert by_served[0]["name"] == traffic.repo
    by_tags = (await get_json(http_session, f"{base}{API}/repositories?sort=tags"))["repositories"]
    assert [r["tags"] for r in by_tags] == sorted((r["tags"] for r in by_tags), reverse=True)

    detail = await get_json(http_session, f"{base}{API}/repositories/{traffic.repo}")
    tags = {t["tag"]: t for t in detail["tags"]}
    assert tags["v1"]["digest"] == traffic.image_digest and tags["v1"]["size"] > traffic.layer_size
    assert tags["multi"]["media_type"] == "application/vnd.oci.image.index.v1+json"
    assert tags["multi"]["platforms"] == ["linux/amd64", "linux/arm64"]
    # pulled through just now: confirmed upstream within the TTL, pulled twice here
    assert tags["v1"]["state"] == "fresh" and time.time() - tags["v1"]["validated_at"] < 600
    assert tags["v1"]["last_pulled"] is not None and tags["v1"]["pulls"] == 2
    images = {i["digest"]: i for i in detail["images"]}
    layers = {layer["digest"]: layer for layer in images[traffic.image_digest]["layers"]}
    assert layers[traffic.shared_layer]["shared_with"] == [traffic.hosted]
    assert layers[traffic.big_layer]["size"] == traffic.layer_size
    assert layers[traffic.big_layer]["shared_with"] == []
    for bad in ("UPPER/case", "a/../b"):
        async with http_session.get(f"{base}{API}/repositories/{bad}") as r:
            assert r.status in (400, 404), bad
            assert (await r.json())["errors"][0]["code"] in ("NAME_INVALID", "NAME_UNKNOWN")
    async with http_session.get(f"{base}{API}/repositories/not/stored") as r:
        assert r.status == 404 and (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"

    storage = await get_json(http_session, f"{base}{API}/storage")
    assert storage["budget"] == 1 << 30 and storage["disk"]["free"] > 0
    assert isinstance(storage["evictions"], list)
    usage = storage["by_upstream"]
    assert set(usage) == {"reg.io", "(hosted)"} and storage["index_complete"]
    assert usage["reg.io"]["bytes"] >= traffic.layer_size + 4000 and usage["reg.io"]["objects"] >= 5
    assert 4000 <= usage["(hosted)"]["bytes"] < traffic.layer_size  # its layer, config, manifest
    assert storage["stored_bytes"] < usage["reg.io"]["bytes"] + usage["(hosted)"]["bytes"]  # shared
    assert storage["fills"] == []

    conf = (await get_json(http_session, f"{base}{API}/config"))["config"]
    assert conf["max_size"] == 1 << 30 and conf["upstreams"]["never.io"]["url"] == "http://127.0.0.1:9"
    assert conf["upstreams"]["reg.io"]["password"] == "<redacted>"
    assert "hunter2-secret" not in json.dumps(conf)


async def test_only_successful_tag_gets_are_pulls(upstream_registry, http_session,
                                                  aiohttp_server, tmp_path):
    """A tag's ``pulls`` counts the GETs that served it: not an unknown tag, not a GET whose
    Accept the manifest is not in, not a HEAD, not a GET by digest."""
    from proxy.handlers.common import PULLTHROUGH, ROUTER
    from tests.support.images import push_image

    cfg = console_config(tmp_path, upstream_registry.url)
    app = create_app(cfg)
    server = await aiohttp_server(app, **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    repo = f"it/pulls-{os.urandom(3).hex()}"
    image = await push_image(http_session, upstream_registry.url, repo, "v1",
                             [b"a layer of the pull counter"], schema="oci")
    oci = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    docker = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}

    async def status(method: str, ref: str, headers: dict[str, str]) -> int:
        async with http_session.request(method, f"{base}/v2/{repo}/manifests/{ref}",
                                        headers=headers) as r:
            await r.read()
            return r.status

    async def pulls(tag: str) -> int:
        return (await app[PULLTHROUGH].tag_status(app[ROUTER].route(repo), tag)).pulls

    assert await status("GET", "nope", oci) == 404  # unknown upstream
    assert await status("GET", "v1", docker) == 404  # resolved and stored, not acceptable
    assert await pulls("nope") == 0 and await pulls("v1") == 0
    detail = await get_json(http_session, f"{base}{API}/repositories/{repo}")
    assert [(t["tag"], t["pulls"]) for t in detail["tags"]] == [("v1", 0)]
    assert await status("HEAD", "v1", oci) == 200
    assert await status("GET", image.digest, oci) == 200
    assert await pulls("v1") == 0
    assert await status("GET", "v1", oci) == 200
    assert await status("GET", "v1", docker) == 404
    assert await status("GET", "v1", oci) == 200  # (from memory: the hot path counts too)
    detail = await get_json(http_session, f"{base}{API}/repositories/{repo}")
    assert [(t["tag"], t["pulls"]) for t in detail["tags"]] == [("v1", 2)]


async def test_a_warm_is_no_pull(upstream_registry, http_session, aiohttp_server, tmp_path):
    """A console warm fills the cache through the manifest path but is not a client's pull:
    the tag's ``pulls`` stays 0; a client GET after it makes 1."""
    import asyncio

    from tests.support.images import push_image

    cfg = console_config(tmp_path, upstream_registry.url)
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    repo = f"it/warm-{os.urandom(3).hex()}"
    await push_image(http_session, upstream_registry.url, repo, "v1",
                     [b"a layer warmed, not pulled"], schema="oci")
    async with http_session.post(f"{base}{API}/warm", json={"image": f"{repo}:v1"}) as r:
        assert r.status == 202, await r.text()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (job := (await get_json(http_session, f"{base}{API}/warm"))["warms"][0])[
            "state"] == "running":
        assert loop.time() < deadline, job
        await asyncio.sleep(0.05)
    assert job["state"] == "done", job

    async def pulls() -> list[tuple[str, int]]:
        detail = await get_json(http_session, f"{base}{API}/repositories/{repo}")
        return [(t["tag"], t["pulls"]) for t in detail["tags"]]

    assert await pulls() == [("v1", 0)]
    async with http_session.get(f"{base}/v2/{repo}/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
        assert r.status == 200
        await r.read()
    assert await pulls() == [("v1", 1)]


async def test_a_repository_s_tags_come_a_page_at_a_time(http_session, aiohttp_server, tmp_path):
    """More tags than a page holds: the first page is full and says where the next starts,
    following the markers lists every tag once, in order; a marker that is no tag is 400."""
    from proxy.handlers.console import TAGS_PER_PAGE
    from tests.support.images import push_image, push_manifest

    cfg = console_config(tmp_path, "http://127.0.0.1:9")
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    repo = "team/many"
    image = await push_image(http_session, base, repo, "latest", [b"one layer, many tags"],
                             schema="oci")
    tags = ["latest", *(f"t{i:04d}" for i in range(TAGS_PER_PAGE + 4))]
    for tag in tags[1:]:
        await push_manifest(http_session, base, repo, tag, image.manifest, image.media_type)
    url = f"{base}{API}/repositories/{repo}"

    first = await get_json(http_session, url)
    assert [t["tag"] for t in first["tags"]] == sorted(tags)[:TAGS_PER_PAGE]
    assert first["tags_total"] == len(tags) and first["tags_truncated"]
    assert first["tags_next"] == sorted(tags)[TAGS_PER_PAGE - 1]
    assert [i["digest"] for i in first["images"]] == [image.digest]
    seen, after = [t["tag"] for t in first["tags"]], first["tags_next"]
    while after is not None:
        page = await get_json(http_session, url, params={"tags_after": after})
        assert len(page["tags"]) <= TAGS_PER_PAGE and page["tags_total"] == len(tags)
        seen += [t["tag"] for t in page["tags"]]
        after = page["tags_next"]
        assert page["tags_truncated"] == (after is not None)
    assert seen == sorted(tags)
    # a marker that is not one of the tags: the page starts after it
    between = await get_json(http_session, url, params={"tags_after": tags[-4] + "z"})
    assert [t["tag"] for t in between["tags"]] == tags[-3:]
    assert not between["tags_truncated"] and between["tags_next"] is None
    for bad in ("", "-x", "a/b", "x" * 129, "sha256:" + "0" * 64, "t 1"):
        async with http_session.get(url, params={"tags_after": bad}) as r:
            assert r.status == 400, bad
            assert (await r.json())["errors"][0]["code"] == "TAG_INVALID", bad


async def test_the_repository_list_comes_a_page_at_a_time(http_session, aiohttp_server, tmp_path,
                                                         monkeypatch):
    """More repositories than a page holds (the cap made small): each answer reads the tags
    of its own repositories only, following ``next`` lists every name once, in order, with
    ``q`` too; a marker that is no repository name, or a search no name can match, is 400."""
    from proxy.handlers import console
    from proxy.handlers.common import STORE
    from tests.support.images import push_image

    monkeypatch.setattr(console, "REPOSITORIES_PER_PAGE", 2)
    cfg = console_config(tmp_path, "http://127.0.0.1:9")
    app = create_app(cfg)
    server = await aiohttp_server(app, **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    names = [f"team/r{i}" for i in range(5)] + ["team/other"]
    for name in names:
        await push_image(http_session, base, name, "latest", [name.encode()], schema="oci")
    store = app[STORE]
    reads: list[str] = []
    list_tags = store.list_tags

    async def counted(key: str) -> list[str] | None:
        reads.append(key)
        return await list_tags(key)

    monkeypatch.setattr(store, "list_tags", counted)
    url = f"{base}{API}/repositories"

    async def walk(total: int, **params: str) -> list[str]:
        seen: list[str] = []
        after = None
        while True:
            reads.clear()
            page = await get_json(http_session, url, params={
                **params, **({} if after is None else {"after": after})})
            assert len(page["repositories"]) <= 2 and len(reads) == len(page["repositories"])
            assert page["total"] == total
            seen += [r["name"] for r in page["repositories"]]
            after = page["next"]
            assert page["truncated"] == (after is not None)
            if after is None:
                return seen

    first = await get_json(http_session, url)
    assert [r["name"] for r in first["repositories"]] == sorted(names)[:2]
    assert first["total"] == len(names) and first["truncated"] and first["next"] == sorted(names)[1]
    assert await walk(len(names)) == sorted(names)
    assert await walk(5, q=" /R") == sorted(names)[1:]  # (lower case, trimmed)
    last = await get_json(http_session, url, params={"q": "/r", "after": "team/r3"})
    assert [r["name"] for r in last["repositories"]] == ["team/r4"] and last["total"] == 5
    # a marker that is not a stored name: the page starts after it
    between = await get_json(http_session, url, params={"after": "team/r2a"})
    assert [r["name"] for r in between["repositories"]] == ["team/r3", "team/r4"]
    assert not between["truncated"] and between["next"] is None
    # the sort orders the page (a page by name)
    await push_image(http_session, base, "team/r1", "second", [b"two tags"], schema="oci")
    by_tags = await get_json(http_session, url, params={"sort": "tags", "after": "team/other"})
    assert [(r["name"], r["tags"]) for r in by_tags["repositories"]] == [("team/r1", 2),
                                                                         ("team/r0", 1)]
    assert by_tags["next"] == "team/r1"
    for params, code in (({"after": ""}, "NAME_INVALID"), ({"after": "UPPER"}, "NAME_INVALID"),
                         ({"after": "a/../b"}, "NAME_INVALID"), ({"after": "x" * 300}, "NAME_INVALID"),
                         ({"q": "a b"}, "NAME_INVALID"), ({"q": "é"}, "NAME_INVALID"),
                         ({"q": "r" * 256}, "NAME_INVALID"), ({"sort": "size"}, "UNSUPPORTED")):
        async with http_session.get(url, params=params) as r:
            assert r.status == 400, params
            assert (await r.json())["errors"][0]["code"] == code, params


async def test_api_needs_the_ops_right(upstream_registry, http_session, aiohttp_server, tmp_path):
    """A user without the ops right gets 403, an anonymous client 401, and neither sees a
    repository name; the watcher (ops only) sees them all."""
    from tests.console.traffic import USERS

    base, _ = await console_with_users(upstream_registry, http_session, aiohttp_server, tmp_path)
    paths = ["/overview", "/upstreams", "/repositories", "/repositories/team/app", "/storage",
             "/config"]
    for path in paths:
        async with http_session.get(f"{base}{API}{path}") as r:
            body = await r.text()
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), path
            assert "team/app" not in body and "console/" not in body
        async with http_session.get(f"{base}{API}{path}", headers=basic("admin")) as r:
            body = await r.text()
            assert r.status == 403, path  # may pull everything, but has no ops right
            assert "team/app" not in body and "it/console" not in body
    for path in ("/_regproxy/console/", "/_regproxy/console/static/console.js"):
        async with http_session.get(f"{base}{path}") as r:
            assert r.status == 401, path
    assert set(USERS) >= {"watcher"}
    repos = await get_json(http_session, f"{base}{API}/repositories", headers=basic("watcher"))
    assert "team/app" in {r["name"] for r in repos["repositories"]}


async def test_console_page_and_static_files(aiohttp_server, tmp_path):
    cfg = console_config(tmp_path, "http://127.0.0.1:9")
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    async with aiohttp.ClientSession() as client:
        async with client.get(server.make_url("/_regproxy/console"), allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/_regproxy/console/"
        async with client.get(server.make_url("/_regproxy/console/")) as r:
            assert r.status == 200 and r.content_type == "text/html"
            csp = r.headers["Content-Security-Policy"]
            page = await r.text()
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in page and " on" not in page.split("<body", 1)[1].split(">")[0]
        for name in ("console.js", "console.css", "uPlot.iife.min.js", "uPlot.min.css"):
            async with client.get(server.make_url(f"/_regproxy/console/static/{name}")) as r:
                assert r.status == 200, name
                assert name in page
        for name in ("console.html", "..%2fconsole.py", "README.md", "uPlot.LICENSE"):
            async with client.get(server.make_url(f"/_regproxy/console/static/{name}")) as r:
                assert r.status == 404, name


def test_time_series_merge_and_percentiles():
    """Buckets of several workers add up, and percentiles come from the summed histogram."""
    a, b = TimeSeries(), TimeSeries()
    now = 1_700_000_005.0
    # 98 fast requests (bucket 0: <= 1 ms) in one worker, two slow ones (bucket 12: 5-10 s)
    fast = [0] * 17
    fast[0] = 98
    slow = [0] * 17
    slow[12] = 2
    a.add(make_row(requests=98, hits=90, misses=8, latency=fast), now=now)
    b.add(make_row(requests=2, misses=2, bytes_upstream=500, latency=slow), now=now + 1)
    merged = TimeSeries.combine([json.loads(json.dumps(a.export())), b.export(), None])
    view = merged.view("15m", now=now + 2)
    totals = view["totals"]
    assert totals["requests"] == 100 and totals["hits"] == 90 and totals["misses"] == 10
    assert totals["hit_ratio"] == 0.9 and totals["bytes_upstream"] == 500
    assert totals["p50_ms"] is not None and totals["p50_ms"] <= 1.0
    assert 5000 <= totals["p99_ms"] <= 10000
    assert view["series"]["time"][-1] == int(now // 10) * 10
    assert sum(1 for v in view["series"]["hit_ratio"] if v is not None) == 1
    # the 7-day window keeps the same counts in coarser buckets
    assert merged.view("7d", now=now + 2)["totals"]["requests"] == 100
    # a window long past drops out of the 15-minute ring but not the 6-hour one
    later = now + 20 * 60
    merged.add(make_row(requests=1, latency=[1]), now=later)
    assert merged.view("15m", now=later)["totals"]["requests"] == 1
    assert merged.view("6h", now=later)["totals"]["requests"] == 101




async def test_purge_action_needs_the_ops_right_and_purges(upstream_registry, http_session,
                                                          aiohttp_server, tmp_path):
    from tests.support.store import is_stored

    base, traffic = await console_with_users(upstream_registry, http_session, aiohttp_server,
                                             tmp_path)
    data = tmp_path / "data"
    assert is_stored(data, traffic.big_layer)
    url = f"{base}{API}/repositories/{traffic.repo}/purge"
    body = {"reference": "v1"}
    await post_expect(http_session, url, 401, json=body)
    # every repository right, but no ops right
    await post_expect(http_session, url, 403, json=body, headers=basic("admin"))
    watcher = basic("watcher")
    # a form (another site's) cannot purge
    await post_expect(http_session, url, 415, data="reference=v1",
                      headers={**watcher, "Content-Type": "application/x-www-form-urlencoded"})
    await post_expect(http_session, url, 403, "DENIED", json=body,
                      headers={**watcher, "Origin": "http://evil.example"})
    await post_expect(http_session, f"{base}{API}/repositories/team/app/purge", 405, "UNSUPPORTED",
                      json={"reference": "latest"}, headers=watcher)
    await post_expect(http_session, url, 404, "MANIFEST_UNKNOWN", json={"reference": "nope"}, headers=watcher)
    assert is_stored(data, traffic.big_layer)

    async with http_session.post(url, json=body, headers={**watcher, "Origin": base}) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["purged"] == f"{traffic.repo}:v1"
    removed = {x["digest"] for x in answer["removed"]}
    # the big layer went; the layer the hosted repository holds too stays
    assert traffic.big_layer in removed and traffic.shared_layer not in removed
    assert not is_stored(data, traffic.big_layer) and is_stored(data, traffic.shared_layer)
    detail = await get_json(http_session, f"{base}{API}/repositories/{traffic.repo}", headers=watcher)
    assert [t["tag"] for t in detail["tags"]] == ["multi"]
    # a hosted repository's tag: deleted by the ops right, refused on a cached one
    delete = f"{base}{API}/repositories/{traffic.hosted}/delete-tag"
    await post_expect(http_session, delete, 403, json={"tag": "latest"}, headers=basic("admin"))
    await post_expect(http_session, f"{base}{API}/repositories/{traffic.repo}/delete-tag", 405, "UNSUPPORTED",
                      json={"tag": "multi"}, headers=watcher)
    await post_expect(http_session, delete, 400, json={"tag": "sha256:" + "0" * 64}, headers=watcher)
    async with http_session.post(delete, json={"tag": "latest"}, headers=watcher) as r:
        assert r.status == 200 and (await r.json()) == {"deleted": f"{traffic.hosted}:latest"}
    await post_expect(http_session, delete, 404, "MANIFEST_UNKNOWN", json={"tag": "latest"}, headers=watcher)
    async with http_session.get(f"{base}/v2/{traffic.hosted}/manifests/latest",
                                headers=basic("admin")) as r:
        assert r.status == 404


async def test_debug_listener_serves_the_console_but_no_action(aiohttp_client, tmp_path):
    """With ``server.debug_listen`` the console and its API move to that listener (no
    authentication there); the actions are served nowhere."""
    from proxy.debuglisten import DEBUG_ADDRESS

    cfg = console_config(tmp_path, "http://127.0.0.1:9", debug_listen=("127.0.0.1", 0),
                         auth=parse_auth(auth_table(tmp_path), tmp_path))
    app = create_app(cfg)
    client = await aiohttp_client(app)
    for path in (f"{API}/overview", f"{API}/repositories", "/_regproxy/console/"):
        async with client.get(path, headers=basic("watcher")) as r:
            assert r.status == 404, path
    async with client.post(f"{API}/repositories/it/x/purge", json={"reference": "v1"},
                           headers=basic("watcher")) as r:
        assert r.status == 404
    host, port = app[DEBUG_ADDRESS]
    debug = f"http://{host}:{port}"
    async with aiohttp.ClientSession() as session:
        for path in (f"{API}/overview?window=6h", f"{API}/upstreams", f"{API}/repositories",
                     f"{API}/storage", f"{API}/config", "/_regproxy/console/",
                     "/_regproxy/console/static/uPlot.iife.min.js"):
            async with session.get(debug + path) as r:
                assert r.status == 200, path
        config = await get_json(session, f"{debug}{API}/config")
        assert config["config"]["auth"]["htpasswd"].endswith("htpasswd")
        for path, body in (("/repositories/it/x/purge", {"reference": "v1"}),
                           ("/repositories/it/x/revalidate", {"tag": "v1"}),
                           ("/warm", {"image": "it/x:v1"})):
            async with session.post(f"{debug}{API}{path}", json=body) as r:
                assert r.status in (404, 405), path


def test_config_page_redacts_every_secret(tmp_path):
    from dataclasses import replace

    from proxy.handlers.console import redacted_config
    from proxy.settings.cluster import ClusterConfig
    from proxy.settings.storage import S3Config

    cfg = replace(console_config(tmp_path, "http://127.0.0.1:9"),
                  s3=S3Config(bucket="b", endpoint_url="http://s3.internal:8333",
                              access_key="AKIA-visible-not", secret_key="s3-secret-value"),
                  cache_backend="redis", cache_url="redis://:redis-pass@redis.internal:6379/0",
                  cluster=ClusterConfig(advertise_url="http://10.0.0.1:5000",
                                        secret="cluster-secret-0123456789", lease=30.0))
    shown = json.dumps(redacted_config(cfg))
    for secret in ("s3-secret-value", "AKIA-visible-not", "redis-pass", "cluster-secret-0123456789",
                   "hunter2-secret"):
        assert secret not in shown, secret
    out = redacted_config(cfg)
    assert out["cache_url"] == "redis://redis.internal:6379/0"
    assert out["s3"]["bucket"] == "b" and out["s3"]["endpoint_url"] == "http://s3.internal:8333"
    assert out["cluster"]["advertise_url"] == "http://10.0.0.1:5000"
    assert out["upstreams"]["reg.io"]["username"] == "puller"


async def test_revalidate_and_warm_actions(upstream_registry, http_session, aiohttp_server,
                                           tmp_path):
    """Re-validate a tag now: the upstream's new digest is taken at once, within the TTL.
    Warm an image: 202, and its blobs are then stored (the job says so when done). Both
    need the ops right, a JSON body and this origin."""
    import asyncio
    import os

    from tests.support.images import make_random_bytes, push_image
    from tests.support.store import is_stored

    base, traffic = await console_with_users(upstream_registry, http_session, aiohttp_server,
                                             tmp_path)
    watcher = {**basic("watcher"), "Origin": base}
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    async def digest_of(tag: str) -> str:
        async with http_session.get(f"{base}/v2/{traffic.repo}/manifests/{tag}",
                                    headers={**basic("admin"), **accept}) as r:
            assert r.status == 200
            return r.headers["Docker-Content-Digest"]

    newer = await push_image(http_session, upstream_registry.url, traffic.repo, "v1",
                             [make_random_bytes(2000, seed=int.from_bytes(os.urandom(4), "big"))],
                             schema="oci")
    assert await digest_of("v1") == traffic.image_digest  # trusted for the TTL (300 s)
    url = f"{base}{API}/repositories/{traffic.repo}/revalidate"
    for headers, status in ((None, 401), (basic("admin"), 403),
                            ({**watcher, "Origin": "http://evil.example"}, 403)):
        async with http_session.post(url, json={"tag": "v1"}, headers=headers) as r:
            assert r.status == status, headers
    await post_expect(http_session, url, 415, data="tag=v1",
                      headers={**watcher, "Content-Type": "application/x-www-form-urlencoded"})
    await post_expect(http_session, f"{base}{API}/repositories/{traffic.hosted}/revalidate", 405,
                      "UNSUPPORTED", json={"tag": "latest"}, headers=watcher)
    await post_expect(http_session, url, 400, json={"tag": "sha256:" + "0" * 64}, headers=watcher)
    async with http_session.post(url, json={"tag": "v1"}, headers=watcher) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer == {"revalidated": f"{traffic.repo}:v1", "digest": newer.digest,
                      "previous": traffic.image_digest, "changed": True, "outcome": "miss"}
    assert await digest_of("v1") == newer.digest
    async with http_session.post(url, json={"tag": "v1"}, headers=watcher) as r:
        assert (await r.json())["changed"] is False
    await post_expect(http_session, url, 404, "MANIFEST_UNKNOWN", json={"tag": "gone"}, headers=watcher)

    # warm: an image the proxy never saw, pulled in the background
    layer = make_random_bytes(50_000, seed=int.from_bytes(os.urandom(4), "big"))
    cold = await push_image(http_session, upstream_registry.url, traffic.repo, "cold", [layer],
                            schema="oci")
    data = tmp_path / "data"
    assert not is_stored(data, cold.layers[0].digest)
    warm = f"{base}{API}/warm"
    for headers, status in ((None, 401), (basic("admin"), 403),
                            ({**watcher, "Origin": "http://evil.example"}, 403)):
        async with http_session.post(warm, json={"image": f"{traffic.repo}:cold"},
                                     headers=headers) as r:
            assert r.status == status, headers
    for bad in ("UPPER/x:1", "a/../b:1", ""):
        async with http_session.post(warm, json={"image": bad}, headers=watcher) as r:
            assert r.status == 400, bad
    await post_expect(http_session, warm, 405, json={"image": f"{traffic.hosted}:latest"}, headers=watcher)
    async with http_session.post(warm, json={"image": f"{traffic.repo}:cold"}, headers=watcher) as r:
        assert r.status == 202, await r.text()
        assert (await r.json())["started"] == f"{traffic.repo}:cold"
    # (it fails in the background, and says so)
    await post_expect(http_session, warm, 202, json={"image": f"{traffic.repo}:nope"}, headers=watcher)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        jobs = {j["image"]: j for j in (await get_json(
            http_session, warm, headers=basic("watcher")))["warms"]}
        if all(j["state"] != "running" for j in jobs.values()):
            break
        assert loop.time() < deadline, jobs
        await asyncio.sleep(0.05)
    done = jobs[f"{traffic.repo}:cold"]
    assert done["state"] == "done" and done["error"] is None, done
    assert done["blobs"] == done["blobs_total"] == 2 and done["manifests"] == 1
    assert done["bytes"] >= 50_000
    assert is_stored(data, cold.layers[0].digest)
    failed = jobs[f"{traffic.repo}:nope"]
    assert failed["state"] == "failed" and failed["error"]


async def test_storage_page_names_evictions_and_dry_runs_gc(upstream_registry, http_session,
                                                             aiohttp_server, tmp_path):
    """A budget of one byte evicts every cached object: each eviction is listed with the
    name that led to it (a tag still pointing at an evicted manifest). A GC dry run after a
    hosted tag's deletion reports that image's own objects, and deletes nothing."""
    import asyncio
    from dataclasses import replace

    from tests.support.store import is_stored

    cfg = replace(console_config(tmp_path, upstream_registry.url), max_size=1)
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    traffic = await make_traffic(http_session, upstream_registry.url, base, tmp_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        storage = await get_json(http_session, f"{base}{API}/storage")
        evicted = {e["digest"]: e for e in storage["evictions"]}
        if traffic.image_digest in evicted and traffic.big_layer in evicted:
            break
        assert loop.time() < deadline, storage["evictions"]
        await asyncio.sleep(0.1)
    assert evicted[traffic.image_digest]["names"] == [f"{traffic.repo}:v1"]
    assert evicted[traffic.big_layer]["names"] in ([traffic.repo], ["(unlinked)"])
    assert evicted[traffic.big_layer]["bytes"] == traffic.layer_size
    assert all(e["names"] for e in storage["evictions"])
    assert traffic.shared_layer not in evicted  # a hosted image holds it

    gc = f"{base}{API}/storage/gc-dry-run"
    await post_expect(http_session, gc, 415, data="x", headers={"Content-Type": "text/plain"})
    for bad in ({"delete_untagged": "yes"}, {"grace_seconds": -1}, {"grace_seconds": "1h"}, []):
        async with http_session.post(gc, json=bad) as r:
            assert r.status == 400, bad
    async with http_session.get(f"{base}/v2/{traffic.hosted}/manifests/latest",
                                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
        hosted_manifest = r.headers["Docker-Content-Digest"]
    await post_expect(http_session, f"{base}{API}/repositories/{traffic.hosted}/delete-tag", 200,
                      json={"tag": "latest"})
    async with http_session.post(gc, json={"grace_seconds": 0}) as r:
        kept_links = await r.json()
    assert r.status == 200 and kept_links["dry_run"] and kept_links["untagged_manifests"] == 0
    async with http_session.post(gc, json={"delete_untagged": True, "grace_seconds": 0}) as r:
        assert r.status == 200
        report = await r.json()
    assert report["untagged_manifests"] == 1
    assert report["untagged_list"] == [{"repository": traffic.hosted, "digest": hosted_manifest}]
    listed = {b["digest"] for b in report["blob_list"]}
    # (v1's manifest was evicted: no manifest reaches the shared layer any more)
    assert {hosted_manifest, traffic.shared_layer} <= listed
    assert report["bytes"] == sum(b["bytes"] for b in report["blob_list"]) > 0
    assert is_stored(tmp_path / "data", hosted_manifest)  # a dry run: nothing went


async def test_fill_in_flight_and_token_status(aiohttp_server, http_session, tmp_path):
    """A warm whose layer stalls upstream (the fault-injecting fake, which wants a bearer
    token) is on the storage page with its bytes so far and its size; when the upstream
    resumes it completes and goes. The upstreams page says a token is cached, until when,
    and never shows it."""
    import asyncio
    import time

    from tests.support.fake_upstream import FakeUpstream
    from tests.support.proxyfix import make_config

    fake = FakeUpstream(require_token="tok-console-1234")
    layer = bytes(range(256)) * 1200  # 307200 bytes: five 64 KiB chunks and a bit
    fake.add_image("it/slow", "v1", [layer])
    layer_digest = next(d for d, b in fake.blobs.items() if b == layer)
    fake.stall_after = 2 * 65536
    upstream = await aiohttp_server(fake.app())
    cfg = make_config(tmp_path / "data", {"fake.io": str(upstream.make_url("")).rstrip("/")})
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    try:
        await post_expect(http_session, f"{base}{API}/warm", 202, json={"image": "it/slow:v1"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            fills = (await get_json(http_session, f"{base}{API}/storage"))["fills"]
            if fills and fills[0]["bytes"] == fake.stall_after:
                break
            assert loop.time() < deadline, fills
            await asyncio.sleep(0.05)
        assert fills == [{"digest": layer_digest, "size": len(layer), "bytes": 2 * 65536,
                          "names": ["it/slow"]}] or fills[0]["names"] == ["(unlinked)"]
        assert fills[0]["digest"] == layer_digest and fills[0]["size"] == len(layer)
    finally:
        fake.resume.set()
    deadline = loop.time() + 30
    while (await get_json(http_session, f"{base}{API}/warm"))["warms"][0]["state"] == "running":
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    assert (await get_json(http_session, f"{base}{API}/warm"))["warms"][0]["state"] == "done"
    while (await get_json(http_session, f"{base}{API}/storage"))["fills"]:  # (published next)
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    ups = await get_json(http_session, f"{base}{API}/upstreams")
    auth = ups["upstreams"][0]["auth"]
    assert auth["scheme"] == "bearer" and auth["token_scope"] == "repository:it/slow:pull"
    assert auth["token_fetched_at"] <= time.time() < auth["token_expires_at"]
    assert auth["token_expires_at"] - auth["token_fetched_at"] < 300 - 14  # (15 s kept back)
    assert "tok-console-1234" not in json.dumps(ups)


async def test_config_page_says_where_each_value_came_from(aiohttp_client, tmp_path):
    """A file, the environment (a ``_FILE`` secret among it) and flags, each named as the
    source of the keys it set; the rest are defaults; no value of a secret is shown."""
    from proxy.config import load

    (tmp_path / "c.toml").write_text('[cache]\ntag_ttl = "1m"\n[upstreams."gcr.io"]\n'
                                     'url = "https://gcr.io"\n')
    (tmp_path / "pw").write_text("env-secret-pw\n")
    env = {"REGPROXY_CACHE_MAX_SIZE": "10GiB", "REGPROXY_UPSTREAMS_GCR_IO_USERNAME": "bot",
           "REGPROXY_UPSTREAMS_GCR_IO_PASSWORD_FILE": str(tmp_path / "pw")}
    cfg = load(tmp_path / "c.toml", env).with_overrides(
        listen="127.0.0.1:0", data_dir=str(tmp_path / "data"))
    client = await aiohttp_client(create_app(cfg))
    answer = await get_json(client, f"{API}/config")
    sources = answer["sources"]
    assert sources["cache.tag_ttl"] == "file" and sources['upstreams."gcr.io".url'] == "file"
    assert sources["cache.max_size"] == "environment (REGPROXY_CACHE_MAX_SIZE)"
    assert sources['upstreams."gcr.io".username'] == "environment (REGPROXY_UPSTREAMS_GCR_IO_USERNAME)"
    # (read from the _FILE, named as the variable it stands for)
    assert sources['upstreams."gcr.io".password'] == "environment (REGPROXY_UPSTREAMS_GCR_IO_PASSWORD)"
    assert sources["server.listen"] == "flag (--listen)" and sources["storage.root"] == "flag (--data-dir)"
    assert sources["cache.tag_stale_while_revalidate"] == "default"
    assert sources["server.workers"] == "default"
    assert "sources" not in answer["config"] and answer["config"]["tag_ttl"] == 60
    assert "env-secret-pw" not in json.dumps(answer)
    # a configuration built in code records none
    plain = await aiohttp_client(create_app(console_config(tmp_path, "http://127.0.0.1:9")))
    assert (await get_json(plain, f"{API}/config"))["sources"] == {}
