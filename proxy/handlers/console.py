"""The web console: a JSON API under ``/_regproxy/api/`` and the static pages under
``/_regproxy/console/`` that read it (uPlot charts, no inline script, no CDN).

Both are operational pages (:data:`proxy.handlers.OPS_PAGES`): with ``[auth]`` only users
with the ``ops`` right see them (they name every repository), with ``server.debug_listen``
only that listener serves them. The figures are every worker's, merged on read
(:mod:`proxy.workerstatus`). See ``docs/console.md``.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Mapping
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy import __version__, metrics
from proxy.config import Config
from proxy.errors import (
    Denied,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from proxy.handlers.common import (
    EVICTOR,
    FILLS,
    HOSTED,
    PULLTHROUGH,
    ROUTER,
    STORE,
    WORKER_STATUS,
    EndpointUnknown,
)
from proxy.mediatypes import INDEXES
from proxy.pullthrough import WarmProgress
from proxy.redact import redact_url
from proxy.reference import Digest, is_tag, parse_reference, validate_name
from proxy.storage.eviction import purge
from proxy.storage.gc import collect
from proxy.timeseries import WINDOWS, TimeSeries
from proxy.workerstatus import combine

log = logging.getLogger("regproxy.console")


class Warms:
    """The images this process is warming for the console, and the last ones it warmed
    (a bounded list: the page shows them; a restart forgets them)."""

    KEEP = 20

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, image: str, work: Any, progress: WarmProgress) -> dict[str, Any]:
        """Run ``work`` (a coroutine) in the background; its job record, updated as it goes."""
        job: dict[str, Any] = {"image": image, "started": time.time(), "finished": None,
                               "state": "running", "error": None, "progress": progress}
        self.jobs = [job, *self.jobs][:self.KEEP]

        async def run() -> None:
            try:
                await work
                job["state"] = "done"
            except RegistryError as exc:
                job["state"], job["error"] = "failed", exc.message
            except Exception as exc:  # (a broken store: said on the page and in the log)
                log.exception("warming %s failed", image)
                job["state"], job["error"] = "failed", type(exc).__name__
            finally:
                job["finished"] = time.time()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def view(self) -> list[dict[str, Any]]:
        return [{**{k: v for k, v in job.items() if k != "progress"},
                 **dataclasses.asdict(job["progress"])} for job in self.jobs]

    async def close(self) -> None:
        """Cancel the warms still running (the upstream session closes next)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


class StorageIndex:
    """What the store holds per upstream, and which names lead to each digest: one walk
    of the repositories' tags and links and of the blob sizes, reused for ``TTL`` seconds
    (the storage page refreshes every 10 s; walking a big store on each would not do)."""

    TTL = 5.0
    #: Tags read per repository for the names (a repository with more names its first).
    TAGS_PER_REPOSITORY = 200

    def __init__(self) -> None:
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self, app: web.Application) -> dict[str, Any]:
        async with self._lock:  # (one walk at a time: concurrent pages share it)
            if self._value is None or time.monotonic() - self._at > self.TTL:
                self._value = await self._walk(app)
                self._at = time.monotonic()
            return self._value

    async def _walk(self, app: web.Application) -> dict[str, Any]:
        store = app[STORE]
        repos = await _repositories(app)
        scanned = repos[:SHARING_SCAN_LIMIT]
        sizes = {stat.digest: stat.size async for stat in store.blob_stats()}
        groups: dict[str, set[Digest]] = {}
        names: dict[str, list[str]] = {}
        for repo in scanned:
            group = "(hosted)" if repo["kind"] == "hosted" else repo["upstream"] or "?"
            held = groups.setdefault(group, set())
            for tag in sorted(await store.list_tags(repo["key"]) or [])[:self.TAGS_PER_REPOSITORY]:
                digest = await store.get_tag(repo["key"], tag)
                if digest is not None:
                    names.setdefault(str(digest), []).append(f"{repo['name']}:{tag}")
            for digest in [*await store.list_manifest_links(repo["key"]),
                           *await store.list_blob_links(repo["key"])]:
                held.add(digest)
                labels = names.setdefault(str(digest), [])
                if not any(label.startswith(repo["name"] + ":") for label in labels):
                    labels.append(repo["name"])
        by_group = {g: {"bytes": sum(sizes.get(d, 0) for d in held),
                        "objects": sum(1 for d in held if d in sizes)}
                    for g, held in sorted(groups.items())}
        return {"measured_at": time.time(), "by_upstream": by_group,
                "stored_bytes": sum(sizes.values()), "stored_objects": len(sizes),
                "complete": len(scanned) == len(repos), "names": names}


#: The effective configuration, for the config page (set at wiring).
CONSOLE_CONFIG = web.AppKey("console_config", Config)
#: The warms this process runs for the console (set at wiring).
CONSOLE_WARMS = web.AppKey("console_warms", Warms)
#: The storage page's walk of the store, cached (set at wiring).
CONSOLE_STORAGE = web.AppKey("console_storage", StorageIndex)

_JSON_HEADERS = {"Cache-Control": "no-store"}
#: The pages' policy: only this origin's script and style, no inline anything, no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_PAGE_HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy": CSP,
                 "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
#: The console's files and their content types (anything else is a 404: no path is
#: built from the URL).
_STATIC = {"console.js": "text/javascript", "console.css": "text/css",
           "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}
#: Repositories whose blob links are read to find shared layers (a bigger store answers
#: without the sharing).
SHARING_SCAN_LIMIT = 2000
#: Config fields whose values never leave the process.
_SECRET_FIELDS = ("password", "secret", "access_key", "secret_key", "token_key")


def _json(data: Any) -> web.Response:
    return web.json_response(data, headers=_JSON_HEADERS)


def _figures(app: web.Application) -> dict[str, Any]:
    metrics.flush()  # what this worker counted since the last flush
    return combine(app[WORKER_STATUS].gather())


async def api_overview(request: web.Request) -> web.Response:
    """Time series of a window (``15m``, ``6h``, ``7d``), totals and workers."""
    window = request.query.get("window", "15m")
    if window not in WINDOWS:
        raise Unsupported(f"window must be one of {', '.join(WINDOWS)}", status=400)
    figures = _figures(request.app)
    view = figures["series"].view(window)
    return _json({"version": __version__, "now": time.time(), **view,
                  "workers": figures["workers"]})


def _upstream_state(breaker: str, activity: dict[str, Any] | None) -> str:
    """One word an operator reads first: ``never_contacted`` is not ``healthy``."""
    if breaker == "open":
        return "down"
    if activity is None or (activity["last_success"] is None and activity["last_failure"] is None):
        return "never_contacted"
    if breaker == "half_open":
        return "recovering"
    last_ok, last_bad = activity["last_success"] or 0, activity["last_failure"] or 0
    return "failing" if last_bad > last_ok else "healthy"


def _latency(series: Any, window: str) -> dict[str, Any]:
    """An upstream's latency chart: p50/p99 per bucket of the window, and its totals."""
    view = series.view(window)
    cols = view["series"]
    return {"time": cols["time"], "p50_ms": cols["p50_ms"], "p99_ms": cols["p99_ms"],
            "requests": view["totals"]["requests"], "p50": view["totals"]["p50_ms"],
            "p99": view["totals"]["p99_ms"]}


async def api_upstreams(request: web.Request) -> web.Response:
    """Every upstream: its state, counts, latency over a ``window`` (``15m``, ``6h``,
    ``7d``: time to the upstream's response headers) and auth (this worker's)."""
    window = request.query.get("window", "15m")
    if window not in WINDOWS:
        raise Unsupported(f"window must be one of {', '.join(WINDOWS)}", status=400)
    figures = _figures(request.app)
    router = request.app[ROUTER]
    out = []
    for u in router.upstreams:
        seen = figures["upstreams"].get(u.name, {"breaker": u.breaker.state.value,
                                                 "ratelimit_remaining": u.ratelimit_remaining})
        act = figures["activity"].get(u.name)
        out.append({
            "name": u.name, "url": redact_url(str(u.base)), "default": u is router.default,
            "state": _upstream_state(seen["breaker"], act),
            "breaker": seen["breaker"], "ratelimit_remaining": seen["ratelimit_remaining"],
            "contacted": act is not None,
            "last_success": None if act is None else act["last_success"],
            "last_failure": None if act is None else act["last_failure"],
            "last_failure_reason": None if act is None else act["last_failure_reason"],
            "requests_by_status": {} if act is None else act["requests"],
            "errors_by_kind": {} if act is None else act["errors"],
            "latency": _latency(TimeSeries() if act is None else act["latency"], window),
            "auth": u.auth_status,
        })
    return _json({"upstreams": out, "window": window, "now": time.time()})


async def _repositories(app: web.Application) -> list[dict[str, Any]]:
    """Every stored repository a name leads to: its name, hosted or cached, the upstream."""
    names = app[ROUTER].names
    out = []
    for key in await app[STORE].list_repositories():
        name = names.name_of_key(key)
        if name is None:
            continue
        hosted = names.is_hosted_key(key)
        place = names.place(name)
        out.append({"name": name, "kind": "hosted" if hosted else "cached",
                    "upstream": place.upstream, "key": key})
    return out


#: Repositories one answer of the list holds (each costs a store read of its tags: a store
#: of tens of thousands is read a page at a time, ``after`` asking for the next).
REPOSITORIES_PER_PAGE = 500
#: The longest search (a part of a repository name; names are at most 255 characters).
QUERY_MAX = 255
#: What a repository name is made of (a search with anything else matches none).
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-/")


def _search(raw: str) -> str:
    """The ``q`` of the list: lower case, a part of a repository name (400 otherwise:
    nothing outside the names' alphabet can match, and it bounds the work)."""
    q = raw.strip().lower()
    if len(q) > QUERY_MAX or not _NAME_CHARS.issuperset(q):
        raise NameInvalid(f"q must be a part of a repository name ({QUERY_MAX} characters"
                          " at most: a-z, 0-9, '.', '_', '-', '/')")
    return q


async def api_repositories(request: web.Request) -> web.Response:
    """A page of the cached and hosted repositories, by name: ``q`` keeps the names with
    that part, ``after`` starts after a name (the ``next`` of the page before); ``sort``
    orders the page's rows: ``name`` (default), ``tags`` or ``served`` (most first: bytes
    sent to clients since the workers started, every worker's) or ``kind``."""
    q = _search(request.query.get("q", ""))
    after = request.query.get("after")
    if after is not None:
        try:
            validate_name(after)
        except NameInvalid:
            raise NameInvalid("after must be a repository name (the next of the previous"
                              " page)") from None
    sort = request.query.get("sort", "name")
    if sort not in ("name", "tags", "served", "kind"):
        raise Unsupported("sort must be name, tags, served or kind", status=400)
    store = request.app[STORE]
    served = _figures(request.app)["stats"].bytes_by_repo
    matching = sorted((r for r in await _repositories(request.app) if q in r["name"]),
                      key=lambda r: r["name"])
    start = 0 if after is None else bisect.bisect_right([r["name"] for r in matching], after)
    repos = matching[start:start + REPOSITORIES_PER_PAGE]
    more = start + REPOSITORIES_PER_PAGE < len(matching)
    for repo in repos:
        tags = await store.list_tags(repo.pop("key"))
        repo["tags"] = len(tags or [])
        repo["served_bytes"] = served.get(repo["name"], 0)
    next_after = repos[-1]["name"] if more else None
    if sort == "tags":
        repos.sort(key=lambda r: (-r["tags"], r["name"]))
    elif sort == "served":
        repos.sort(key=lambda r: (-r["served_bytes"], r["name"]))
    elif sort == "kind":
        repos.sort(key=lambda r: (r["kind"], r["name"]))
    return _json({"repositories": repos, "total": len(matching), "truncated": more,
                  "next": next_after, "query": q, "sort": sort})


def _descriptor(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
        return None
    try:  # (a stored manifest was verified as bytes, its descriptors are still its own)
        Digest.parse(entry["digest"])
    except DigestInvalid:
        return None
    size = entry.get("size")
    return {"digest": entry["digest"], "media_type": entry.get("mediaType"),
            "size": size if isinstance(size, int) else None}


async def _image(app: web.Application, digest: Digest) -> dict[str, Any]:
    """What a stored manifest is made of: an index's platforms, an image's layers."""
    stored = await app[STORE].get_manifest(digest)
    if stored is None:
        return {"digest": str(digest), "stored": False}
    try:
        doc = json.loads(stored.data)
    except ValueError:
        doc = {}
    out: dict[str, Any] = {"digest": str(digest), "stored": True, "media_type": stored.media_type,
                           "manifest_size": len(stored.data)}
    if stored.media_type in INDEXES:
        platforms = []
        for entry in doc.get("manifests", []) if isinstance(doc, dict) else []:
            desc = _descriptor(entry)
            if desc is None:
                continue
            plat = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
            desc["platform"] = "/".join(str(plat[k]) for k in ("os", "architecture", "variant")
                                        if plat.get(k))
            desc["stored"] = await app[STORE].has_manifest(Digest.parse(desc["digest"]))
            platforms.append(desc)
        out["platforms"] = platforms
        out["size"] = sum(p["size"] or 0 for p in platforms)
        return out
    config = _descriptor(doc.get("config")) if isinstance(doc, dict) else None
    layers = [d for e in (doc.get("layers", []) if isinstance(doc, dict) else [])
              if (d := _descriptor(e)) is not None]
    out["config"] = config
    out["layers"] = layers
    out["size"] = len(stored.data) + (config["size"] or 0 if config else 0) + sum(
        layer["size"] or 0 for layer in layers)
    return out


#: Tags one answer of a repository lists (each costs store reads: a repository with tens
#: of thousands of tags is read a page at a time, ``tags_after`` asking for the next).
TAGS_PER_PAGE = 200


def _tag_page(tags: list[str], after: str | None) -> tuple[list[str], str | None]:
    """The sorted tags' page after ``after`` (from the first: ``None``) and the marker of
    the next page (``None``: this is the last)."""
    ordered = sorted(tags)
    start = 0 if after is None else bisect.bisect_right(ordered, after)
    page = ordered[start:start + TAGS_PER_PAGE]
    return page, page[-1] if start + TAGS_PER_PAGE < len(ordered) else None


async def api_repository(request: web.Request) -> web.Response:
    """One repository: a page of its tags (digest, media type, size, an index's platforms)
    and per image its layers, each with the other repositories that hold it too."""
    name = validate_name(request.match_info["name"])
    after = request.query.get("tags_after")
    if after is not None and not is_tag(after):
        raise TagInvalid("tags_after must be a tag (the tags_next of the previous page)")
    app = request.app
    repos = await _repositories(app)
    found = next((r for r in repos if r["name"] == name), None)
    if found is None:
        raise NameUnknown(f"no repository {name} is stored")
    store = app[STORE]
    route = None if found["kind"] == "hosted" else app[ROUTER].route(name)
    tags_out = []
    images: dict[str, dict[str, Any]] = {}
    every = await store.list_tags(found["key"]) or []
    page, next_after = _tag_page(every, after)
    for tag in page:
        digest = await store.get_tag(found["key"], tag)
        if digest is None:
            continue
        image = images.get(str(digest)) or await _image(app, digest)
        images[str(digest)] = image
        status = None if route is None else await app[PULLTHROUGH].tag_status(route, tag)
        tags_out.append({"tag": tag, **{k: image.get(k) for k in (
            "digest", "media_type", "size", "stored")},
            "platforms": [p["platform"] for p in image.get("platforms", [])],
            "validated_at": None if status is None else status.validated_at,
            "state": None if status is None or status.fresh is None
            else ("fresh" if status.fresh else "stale"),
            "last_pulled": await store.blob_last_used(digest),
            "pulls": None if status is None else status.pulls})
        for child in image.get("platforms", []):
            if child["stored"] and child["digest"] not in images:
                images[child["digest"]] = await _image(app, Digest.parse(child["digest"]))
    # which other repositories hold each layer (their blob links)
    wanted = {layer["digest"] for img in images.values() for layer in img.get("layers", [])}
    holders: dict[str, list[str]] = {d: [] for d in wanted}
    if wanted and len(repos) <= SHARING_SCAN_LIMIT:
        for repo in repos:
            if repo["key"] == found["key"]:
                continue
            for d in await store.list_blob_links(repo["key"]):
                if str(d) in holders:
                    holders[str(d)].append(repo["name"])
    for img in images.values():
        for layer in img.get("layers", []):
            layer["shared_with"] = sorted(holders.get(layer["digest"], []))
    return _json({"name": name, "kind": found["kind"], "upstream": found["upstream"],
                  "tags": tags_out, "tags_total": len(every),
                  "tags_truncated": next_after is not None, "tags_next": next_after,
                  "images": list(images.values()),
                  "sharing_scanned": len(repos) <= SHARING_SCAN_LIMIT})


def _label(names: dict[str, list[str]], digest: str) -> list[str]:
    """What a digest is called: ``repository:tag`` where a tag points at it, else the
    repositories linked to it, else ``(unlinked)``."""
    return names.get(digest) or ["(unlinked)"]


async def api_storage(request: web.Request) -> web.Response:
    """The eviction pass's figures, bytes per upstream and hosted, the recent evictions
    with the names that lead to them, and this worker's fills in flight."""
    figures = _figures(request.app)
    evictor, workers = request.app[EVICTOR], request.app[WORKER_STATUS]
    report = figures["cache"]
    index = await request.app[CONSOLE_STORAGE].get(request.app)
    names = index["names"]
    return _json({
        "budget": evictor.max_size or None,
        "max_age_seconds": evictor.max_age or None,
        "measured_at": report["time"] if report else None,
        "cached_bytes": report["evictable"] + report["shared"] if report else None,
        "evictable_bytes": report["evictable"] if report else None,
        "shared_bytes": report["shared"] if report else None,
        "hosted_bytes": report["hosted"] if report else None,
        "disk": workers.disk(),
        "evictions": [{"time": t, "digest": d, "bytes": b, "names": _label(names, d)}
                      for t, d, b in reversed(figures["evictions"])],
        "by_upstream": index["by_upstream"], "stored_bytes": index["stored_bytes"],
        "stored_objects": index["stored_objects"], "index_complete": index["complete"],
        "index_measured_at": index["measured_at"],
        "fills": [{"digest": str(d), "size": size, "bytes": done, "names": _label(names, str(d))}
                  for d, size, done in request.app[FILLS].in_flight()],
    })


#: Objects a GC dry run lists (the counts and bytes are always whole).
GC_LIST_LIMIT = 200


async def action_gc_dry_run(request: web.Request) -> web.Response:
    """What ``regproxy gc`` would remove now, removing nothing: ``{"delete_untagged":
    false, "grace_seconds": 3600}`` (both optional, as the command's flags)."""
    body = await _json_object(request, '{"delete_untagged": false, "grace_seconds": 3600}')
    untagged, grace = body.get("delete_untagged", False), body.get("grace_seconds", 3600)
    if not isinstance(untagged, bool):
        raise Unsupported("delete_untagged must be true or false", status=400)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
        raise Unsupported("grace_seconds must be a number of seconds, 0 or more", status=400)
    started = time.monotonic()
    report = await collect(request.app[STORE], dry_run=True, delete_untagged=untagged,
                           grace=float(grace))
    names = request.app[ROUTER].names
    return _json({
        "dry_run": True, "delete_untagged": untagged, "grace_seconds": grace,
        "bytes": report.bytes_freed, "blobs": len(report.blobs), "kept": report.kept,
        "untagged_manifests": len(report.untagged),
        "blob_list": [{"digest": str(d), "bytes": n} for d, n in report.blobs[:GC_LIST_LIMIT]],
        "untagged_list": [{"repository": names.name_of_key(r) or r, "digest": str(d)}
                          for r, d in report.untagged[:GC_LIST_LIMIT]],
        "seconds": round(time.monotonic() - started, 3)})


def redacted_config(value: Any, key: str = "") -> Any:
    """A config value as JSON, secrets replaced and URLs without credentials."""
    if any(s in key for s in _SECRET_FIELDS):
        return None if value is None else "<redacted>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: redacted_config(getattr(value, f.name), f.name)
                for f in dataclasses.fields(value) if f.repr or not any(
                    s in f.name for s in _SECRET_FIELDS)}
    if isinstance(value, Mapping):
        return {str(k): redacted_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redacted_config(v, key) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    text = str(value)
    return redact_url(text) if "://" in text else text


async def api_config(request: web.Request) -> web.Response:
    """The effective configuration, redacted, and where each key's value came from."""
    config = request.app.get(CONSOLE_CONFIG)
    if config is None:
        return _json({"config": None, "sources": {}})
    shown = redacted_config(config)
    shown.pop("sources", None)
    return _json({"config": shown, "sources": dict(sorted(config.sources.items()))})


@functools.cache
def _file(name: str) -> bytes:
    """A console file, read once (they are small, and the loop must not wait on a disk)."""
    return resources.files("proxy").joinpath("console/static", name).read_bytes()


async def console_page(request: web.Request) -> web.Response:
    """The one page: its sections (overview, upstreams, repositories, storage,
    configuration) are shown by the script from the URL's fragment."""
    body = _file("console.html")
    return web.Response(body=body, content_type="text/html", charset="utf-8",
                        headers=_PAGE_HEADERS)


async def console_static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    content_type = _STATIC.get(name)
    if content_type is None:
        raise EndpointUnknown(f"no console file {name[:100]!r}")
    body = _file(name)
    return web.Response(body=body, content_type=content_type, charset="utf-8",
                        headers={"Cache-Control": "max-age=300", "Content-Security-Policy": CSP})


async def console_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/_regproxy/console/")


def _same_origin(request: web.Request) -> None:
    """Actions come from the console's own script: a JSON body (a form cannot send one
    without a CORS preflight, which nothing here answers) and, when the browser says where
    the page came from, this origin (a browser remembers Basic credentials: no other site
    may act with them)."""
    if request.content_type != "application/json":
        raise Unsupported("actions take a JSON body (Content-Type: application/json)", status=415)
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise Denied("actions are accepted from the console's own origin only")


async def action_purge(request: web.Request) -> web.Response:
    """Purge a cached image: ``{"reference": "<tag or digest>"}`` removes the tag (or the
    manifest) and the content only it used, as ``regproxy cache purge NAME:TAG`` does; every
    process drops what it holds in memory at the purge marker's change."""
    name = validate_name(request.match_info["name"])
    ref = await _body(request, "reference", "<tag or digest>")
    reference = parse_reference(ref)
    app = request.app
    found = next((r for r in await _repositories(app) if r["name"] == name), None)
    if found is None:
        raise NameUnknown(f"no repository {name} is stored")
    if found["kind"] == "hosted":
        raise Unsupported(f"{name} is a hosted repository: delete its tags through the API")
    store, names = app[STORE], app[ROUTER].names
    key = found["key"]
    exists = (await store.has_manifest_link(key, reference) if isinstance(reference, Digest)
              else await store.get_tag(key, reference) is not None)
    if not exists:
        raise ManifestUnknown(f"nothing cached as {name}{'@' if isinstance(reference, Digest) else ':'}{ref}")
    removed = await purge(store, key, reference, names.is_hosted_key)
    await store.mark_purge()
    app[PULLTHROUGH].forget([d for d, _ in removed])
    return _json({"purged": f"{name}{'@' if isinstance(reference, Digest) else ':'}{ref}",
                  "removed": [{"digest": str(d), "bytes": n} for d, n in removed],
                  "bytes": sum(n for _, n in removed)})


async def action_delete_tag(request: web.Request) -> web.Response:
    """Delete a tag of a hosted repository: ``{"tag": "<tag>"}`` (the manifest stays, as
    ``DELETE /v2/<name>/manifests/<tag>`` does; ``hosted.delete_enabled`` applies)."""
    name = validate_name(request.match_info["name"])
    reference = parse_reference(await _body(request, "tag", "<tag>"))
    if not isinstance(reference, str):
        raise Unsupported("expected a tag, not a digest", status=400)
    route = request.app[ROUTER].route(name)
    if not route.hosted:
        raise Unsupported(f"{name} is a cached repository: purge its images instead")
    await request.app[HOSTED].delete_manifest(route, reference)
    return _json({"deleted": f"{name}:{reference}"})


async def _json_object(request: web.Request, expected: str) -> dict[str, Any]:
    """An action's JSON body, an object, once its origin is checked (:func:`_same_origin`)."""
    _same_origin(request)
    try:
        body = await request.json()
    except ValueError:
        raise Unsupported("the body is not JSON", status=400) from None
    if not isinstance(body, dict):
        raise Unsupported(f"expected {expected}", status=400)
    return body


async def _body(request: web.Request, key: str, shape: str) -> str:
    """An action's one string argument, from its JSON body."""
    value = (await _json_object(request, f'{{"{key}": "{shape}"}}')).get(key)
    if not isinstance(value, str) or not value:
        raise Unsupported(f'expected {{"{key}": "{shape}"}}', status=400)
    return value


async def action_revalidate(request: web.Request) -> web.Response:
    """Re-validate a cached tag now: ``{"tag": "<tag>"}`` asks the upstream what it is
    (a HEAD; the manifest is fetched only when the digest changed), whatever its TTL."""
    name = validate_name(request.match_info["name"])
    reference = parse_reference(await _body(request, "tag", "<tag>"))
    if not isinstance(reference, str):
        raise Unsupported("expected a tag, not a digest", status=400)
    route = request.app[ROUTER].route(name)
    if route.hosted:
        raise Unsupported(f"{name} is a hosted repository: its tags are its own")
    previous = await request.app[STORE].get_tag(route.key, reference)
    result = await request.app[PULLTHROUGH].revalidate_tag(route, reference)
    return _json({"revalidated": f"{name}:{reference}", "digest": str(result.digest),
                  "previous": None if previous is None else str(previous),
                  "changed": previous is not None and previous != result.digest,
                  "outcome": result.outcome.value})


def split_image(image: str) -> tuple[str, str | Digest]:
    """``name:tag`` or ``name@digest`` (no tag: ``latest``), each part validated."""
    if "@" in image:
        name, ref = image.split("@", 1)
    else:
        head, _, last = image.rpartition("/")
        name, _, ref = last.partition(":")
        name = f"{head}/{name}" if head else name
        ref = ref or "latest"
    return validate_name(name), parse_reference(ref)


async def action_warm(request: web.Request) -> web.Response:
    """Warm a cached image: ``{"image": "<name>:<tag>"}`` pulls it into the cache in the
    background, as ``regproxy warm`` does (the default platform of an index); 202 with
    the job started, whose progress ``GET /_regproxy/api/warm`` shows."""
    name, reference = split_image((await _body(request, "image", "<name>:<tag>"))[:400])
    route = request.app[ROUTER].route(name)
    if route.hosted:
        raise Unsupported(f"{name} is a hosted repository: it is stored, not cached")
    image = f"{name}{'@' if isinstance(reference, Digest) else ':'}{reference}"
    progress = WarmProgress()
    job = request.app[CONSOLE_WARMS].start(
        image, request.app[PULLTHROUGH].warm(route, reference, progress), progress)
    return web.json_response({"started": image, "at": job["started"]}, status=202,
                             headers=_JSON_HEADERS)


async def api_warms(request: web.Request) -> web.Response:
    """This process's warms, newest first, with their progress."""
    return _json({"warms": request.app[CONSOLE_WARMS].view()})


#: The console's actions (POST; registered with the operational pages' access rule).
CONSOLE_ACTIONS = {"/_regproxy/api/repositories/{name:.+}/purge": action_purge,
                   "/_regproxy/api/repositories/{name:.+}/delete-tag": action_delete_tag,
                   "/_regproxy/api/repositories/{name:.+}/revalidate": action_revalidate,
                   "/_regproxy/api/warm": action_warm,
                   "/_regproxy/api/storage/gc-dry-run": action_gc_dry_run}

#: The console's routes (registered as operational pages by :mod:`proxy.handlers`).
CONSOLE_PAGES = {
    "/_regproxy/api/overview": api_overview,
    "/_regproxy/api/upstreams": api_upstreams,
    "/_regproxy/api/repositories": api_repositories,
    "/_regproxy/api/repositories/{name:.+}": api_repository,
    "/_regproxy/api/storage": api_storage,
    "/_regproxy/api/config": api_config,
    "/_regproxy/api/warm": api_warms,
    "/_regproxy/console": console_redirect,
    "/_regproxy/console/": console_page,
    "/_regproxy/console/static/{file}": console_static,
}

__all__ = ["CONSOLE_ACTIONS", "CONSOLE_CONFIG", "CONSOLE_PAGES", "CONSOLE_STORAGE", "CONSOLE_WARMS", "CSP",
           "QUERY_MAX", "REPOSITORIES_PER_PAGE", "TAGS_PER_PAGE", "StorageIndex", "Warms",
           "redacted_config", "split_image"]
