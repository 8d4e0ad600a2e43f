"""The status page: a self-contained HTML page (no build step, no JavaScript) for people
who would rather look than read logs, and the same figures as JSON."""

from __future__ import annotations

import html
import os
import time
from typing import Any

from aiohttp import web

from proxy import __version__, metrics
from proxy.handlers.common import EVICTOR, ROUTER, WORKER_STATUS
from proxy.redact import redact_url
from proxy.stats import hit_ratio
from proxy.workerstatus import combine

_HEADERS = {"Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def snapshot(app: web.Application) -> dict[str, Any]:
    """Every figure the page shows, summed over the workers."""
    metrics.flush()  # the requests counted since the last flush
    router, evictor = app[ROUTER], app[EVICTOR]
    workers = app[WORKER_STATUS]
    parts = workers.gather()
    figures = combine(parts)
    stats = figures["stats"]
    totals = stats.totals()
    report = figures["cache"]
    upstreams = figures["upstreams"]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - stats.started),
        "workers": figures["workers"],
        "upstreams": [{
            "name": u.name, "url": redact_url(str(u.base)), "default": u is router.default,
            "breaker": upstreams[u.name]["breaker"],
            "ratelimit_remaining": upstreams[u.name]["ratelimit_remaining"],
            # each URL tried in order, with its breaker (``breaker``: the upstream's, open
            # only when every URL is)
            "urls": [{"url": url, "breaker": upstreams[u.name].get("urls", {}).get(url, state.value)}
                     for url, state in u.url_states()],
        } for u in router.upstreams],
        "cache": {
            # what cached content uses, and of it what eviction may remove (the budget's part)
            "bytes": report["evictable"] + report["shared"] if report else None,
            "evictable_bytes": report["evictable"] if report else None,
            "hosted_bytes": report["hosted"] if report else None,
            "budget": evictor.max_size, "max_age_seconds": evictor.max_age,
        },
        "disk": workers.disk(),
        "hit_ratio": hit_ratio(totals),
        "outcomes": dict(totals),
        "hit_ratio_series": stats.hit_ratio_series(),
        "top_repositories": stats.bytes_by_repo.most_common(10),
        "recent_evictions": [{"time": t, "digest": d, "bytes": b}
                             for t, d, b in reversed(figures["evictions"])],
    }


def _chart(series: list[tuple[int, float | None]], width: int = 720, height: int = 120) -> str:
    """Hit ratio per minute as an inline SVG polyline (gaps where nothing was served)."""
    n = max(len(series) - 1, 1)
    segments: list[list[str]] = [[]]
    for i, (_, ratio) in enumerate(series):
        if ratio is None:
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append(f"{i * width / n:.1f},{height - ratio * height:.1f}")
    lines = "".join(
        f'<polyline fill="none" stroke="#2a7" stroke-width="2" points="{" ".join(seg)}"/>'
        for seg in segments if seg)
    grid = "".join(
        f'<line x1="0" x2="{width}" y1="{y}" y2="{y}" stroke="#ddd"/>'
        f'<text x="{width - 2}" y="{max(y - 3, 10)}" font-size="10" fill="#999" '
        f'text-anchor="end">{label}</text>'
        for y, label in ((0, "100%"), (height / 2, "50%"), (height, "0%")))
    return (f'<svg role="img" aria-label="hit ratio, last {len(series) // 60} hours" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">{grid}{lines}</svg>')


def _url_states(up: dict[str, Any]) -> str:
    """The breaker of each URL, for an upstream with more than one."""
    if len(up["urls"]) < 2:
        return ""
    return " (" + ", ".join(f"{html.escape(u['url'])}: {html.escape(u['breaker'])}"
                            for u in up["urls"]) + ")"


def render(snap: dict[str, Any]) -> str:
    e = html.escape
    ups = "".join(
        f"<tr><td>{e(u['name'])}{' (default)' if u['default'] else ''}</td><td>{e(u['url'])}</td>"
        f"<td class='{e(u['breaker'])}'>{e(u['breaker'])}{_url_states(u)}</td>"
        f"<td>{e(str(u['ratelimit_remaining'] or '-'))}</td></tr>" for u in snap["upstreams"])
    cache = snap["cache"]
    size, evictable = cache["bytes"], cache["evictable_bytes"]
    budget = cache["budget"]
    pct = min(100.0, 100.0 * evictable / budget) if evictable is not None and budget else None
    bar = (f"<div class='bar'><div style='width:{pct:.1f}%'></div></div>" if pct is not None else "")
    if size is None:
        size_text = "not measured yet"
    else:
        size_text = (f"{_human(size)} cached, of which {_human(evictable)} evictable"
                     + (f" of a {_human(budget)} budget ({pct:.0f}%)" if pct is not None
                        else " (no budget set)")
                     + f"; {_human(cache['hosted_bytes'])} hosted only")
    disk = snap["disk"]
    disk_text = (f"disk: {_human(disk['free'])} free of {_human(disk['size'])}" if disk
                 else "disk: unknown")
    n_workers = len(snap["workers"])
    who = (f"{n_workers} workers, this page from process {snap['pid']}" if n_workers > 1
           else f"process {snap['pid']}")
    ratio = snap["hit_ratio"]
    top = "".join(f"<tr><td>{e(repo)}</td><td>{_human(n)}</td></tr>"
                  for repo, n in snap["top_repositories"]) or "<tr><td colspan=2>none yet</td></tr>"
    evictions = "".join(
        f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(ev['time']))}</td>"
        f"<td><code>{e(ev['digest'][:23])}</code></td><td>{_human(ev['bytes'])}</td></tr>"
        for ev in snap["recent_evictions"]) or "<tr><td colspan=3>none</td></tr>"
    up = snap["uptime_seconds"]
    ratio_text = f"{ratio * 100:.1f}%" if ratio is not None else "no requests yet"
    outcomes = ", ".join(f"{e(k)} {v}" for k, v in sorted(snap["outcomes"].items())) or "none yet"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>regproxy status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:780px;color:#222}}
h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}}
table{{border-collapse:collapse;width:100%}}
td,th{{text-align:left;padding:3px 8px;border-bottom:1px solid #eee}}
.closed{{color:#2a7}} .open{{color:#c33;font-weight:bold}} .half_open{{color:#c80}}
.bar{{background:#eee;height:12px;border-radius:6px;overflow:hidden}}
.bar div{{background:#2a7;height:12px}}
.muted{{color:#777}}
</style></head><body>
<h1>regproxy {e(snap['version'])}</h1>
<p class="muted">{who}, up {up // 3600} h {up % 3600 // 60} min
&middot; <a href="/metrics">metrics</a> &middot; <a href="/status.json">json</a></p>
<h2>Upstreams</h2>
<table><tr><th>name</th><th>url</th><th>circuit</th><th>rate limit left</th></tr>{ups}</table>
<h2>Cache</h2><p>{size_text}</p>{bar}<p class="muted">{disk_text}</p>
<h2>Hit ratio</h2>
<p>{ratio_text} <span class="muted">({outcomes})</span></p>
{_chart(snap['hit_ratio_series'])}
<p class="muted">per minute, last 6 hours{" (all workers)" if n_workers > 1 else ""}</p>
<h2>Top repositories by bytes served</h2><table>{top}</table>
<h2>Recent evictions</h2><table>{evictions}</table>
</body></html>"""


async def status_page(request: web.Request) -> web.Response:
    return web.Response(text=render(snapshot(request.app)), content_type="text/html",
                        headers=_HEADERS)


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(snapshot(request.app), headers=_HEADERS)
