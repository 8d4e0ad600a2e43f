"""The console in a real browser: Debian's headless chromium driven by Playwright, against
a proxy serving real traffic (pulls through it from the real upstream docker-registry).

Checks that every page renders what the API says (charts with data points, the upstream
states, the repository search, the layers shared with another repository), that the page
runs under its CSP (an injected inline script does not run) without a console error, and
that it fits a phone's width, and that the purge action purges (the API and the store
then say so) and deleting a hosted tag deletes it. Screenshots go to
``tests/artifacts/console/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import async_playwright

from proxy.app import create_app
from proxy.handlers.common import EVICTOR
from proxy.server import runner_kwargs
from tests.console.traffic import console_config, make_traffic
from tests.support.images import make_random_bytes, push_image
from tests.support.store import is_stored

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
#: How long a page may take to load and draw (a condition waited for, not a sleep).
DEADLINE_MS = 20_000



@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    assert HAVE_CHROMIUM, "chromium is missing: bash scripts/install-test-deps.sh"
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            await b.close()


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, page: Any, base: str) -> None:
        self.page, self.base = page, base
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    async def open(self, section: str) -> None:
        url = f"{self.base}/_regproxy/console/#{section}"
        if self.page.url.startswith(f"{self.base}/_regproxy/console/"):
            await self.page.evaluate("s => { location.hash = s; }", section)
        else:
            await self.page.goto(url)
        await self.page.wait_for_selector(f"body[data-loaded={section}]", timeout=DEADLINE_MS)
        assert await self.page.is_hidden("#error"), await self.page.inner_text("#error")

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_console_pages_in_chromium(browser, upstream_registry, http_session,
                                         aiohttp_server, tmp_path):
    # (as proxy.config.load records them: a configuration built in code has none)
    cfg = replace(console_config(tmp_path, upstream_registry.url), sources={
        "cache.max_size": "file", "server.workers": "environment (REGPROXY_SERVER_WORKERS)",
        "server.listen": "flag (--listen)", "cache.tag_ttl": "default"})
    app = create_app(cfg)
    server = await aiohttp_server(app, **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    traffic = await make_traffic(http_session, upstream_registry.url, base, tmp_path)

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    p = Page(await context.new_page(), base)

    # overview: four charts, each drawn by uPlot with data points
    await p.open("overview")
    for chart in ("requests", "hits", "bytes", "latency"):
        node = p.page.locator(f"#chart-{chart}")
        await node.locator("canvas").wait_for(timeout=DEADLINE_MS)
        assert int(await node.get_attribute("data-points")) > 0, chart
        box = await node.locator("canvas").bounding_box()
        assert box["width"] > 400 and box["height"] > 100, chart
    assert "%" in await p.page.inner_text("#totals")
    await p.page.click("[data-window='6h']")
    await p.page.wait_for_selector("body[data-loaded=overview]", timeout=DEADLINE_MS)
    assert int(await p.page.get_attribute("#chart-requests", "data-points")) > 0
    await p.page.click("[data-window='15m']")
    await p.page.wait_for_selector("body[data-loaded=overview]", timeout=DEADLINE_MS)
    await p.shot("overview")

    # the CSP holds: a script injected into the page does not run
    ran = await p.page.evaluate("""() => new Promise(resolve => {
        document.addEventListener('securitypolicyviolation', () => resolve(window.__ran === 1));
        const s = document.createElement('script');
        s.textContent = 'window.__ran = 1';
        document.body.append(s);
    })""")
    assert ran is False
    p.errors = [e for e in p.errors if "Content Security Policy" not in e]  # (ours, on purpose)

    # upstreams: the one pulled from is healthy, the one never asked says so
    await p.open("upstreams")
    rows = {(await r.locator("td").first.inner_text()).split()[0]: await r.inner_text()
            for r in await p.page.locator("#upstreams-table tbody tr").all()}
    assert "healthy" in rows["reg.io"] and "never contacted" in rows["never.io"]
    assert "not asked yet" in rows["never.io"]  # (auth: no challenge seen)
    chart = p.page.locator("[data-upstream-chart='reg.io']")
    await chart.locator("canvas").wait_for(timeout=DEADLINE_MS)
    assert int(await chart.locator(".chart").get_attribute("data-points")) > 0
    assert "p50" in await chart.locator("figcaption").inner_text()
    assert int(await p.page.get_attribute("[data-upstream-chart='never.io'] .chart", "data-points")) == 0
    await p.shot("upstreams")

    # repositories: the search filters the list; a repository's tags and shared layers
    await p.open("repositories")
    table = p.page.locator("#repo-table tbody tr")
    await table.nth(1).wait_for(timeout=DEADLINE_MS)
    names = await table.locator("td:first-child").all_inner_texts()
    assert traffic.repo in names and traffic.hosted in names
    await p.page.fill("#repo-search", "app")
    await p.page.wait_for_function(
        "n => document.querySelectorAll('#repo-table tbody tr').length === n", arg=1,
        timeout=DEADLINE_MS)
    assert await table.locator("td:first-child").all_inner_texts() == [traffic.hosted]
    await p.page.fill("#repo-search", traffic.repo.split("/")[1])
    await p.page.wait_for_function(
        "name => [...document.querySelectorAll('#repo-table tbody tr')].map(r => r.dataset.name)"
        ".join() === name", arg=traffic.repo, timeout=DEADLINE_MS)
    await table.first.click()
    await p.page.wait_for_selector("#tag-table", timeout=DEADLINE_MS)
    tags = await p.page.inner_text("#tag-table")
    assert "multi" in tags and "linux/arm64" in tags and traffic.image_digest in tags
    state = await p.page.inner_text("#tag-table tr[data-tag='v1'] td.tag-state")
    assert state == "fresh"
    layers = await p.page.inner_text("#repo-detail")
    assert traffic.shared_layer in layers and traffic.hosted in layers
    await p.shot("repositories")

    dialogs: list[str] = []

    async def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.accept()

    p.page.on("dialog", accept)
    # re-validate a tag the upstream moved: the page shows the new digest at once (TTL 300 s)
    moved = await push_image(http_session, upstream_registry.url, traffic.repo, "multi",
                             [make_random_bytes(1500, seed=int.from_bytes(os.urandom(4), "big"))],
                             schema="oci")
    await p.page.click("#tag-table tr[data-tag='multi'] button.revalidate")
    await p.page.wait_for_function(
        "() => document.querySelector('#repo-notice').textContent.startsWith('revalidated')",
        timeout=DEADLINE_MS)
    assert moved.digest in await p.page.inner_text("#repo-notice")
    await p.page.wait_for_function(
        "d => document.querySelector(\"#tag-table tr[data-tag='multi']\").textContent.includes(d)",
        arg=moved.digest, timeout=DEADLINE_MS)
    assert dialogs == [f"Ask the upstream what {traffic.repo}:multi is now?"]

    # warm an image the proxy never saw: the job appears, ends "done", its layer is stored
    cold = await push_image(http_session, upstream_registry.url, traffic.repo, "cold",
                            [make_random_bytes(20_000, seed=int.from_bytes(os.urandom(4), "big"))],
                            schema="oci")
    await p.page.fill("#warm-image", f"{traffic.repo}:cold")
    await p.page.click("#warm-form button[type=submit]")
    await p.page.wait_for_selector(f"#warm-table tr[data-image='{traffic.repo}:cold'][data-state=done]",
                                   timeout=DEADLINE_MS)
    assert is_stored(tmp_path / "data", cold.layers[0].digest)
    await p.shot("repositories-actions")

    # the purge action, confirmed in the browser's dialog: the tag and its own layer go
    await p.page.click("#tag-table tr[data-tag='v1'] button.purge")
    await p.page.wait_for_function(
        "() => document.querySelector('#repo-notice').textContent.startsWith('purged')",
        timeout=DEADLINE_MS)
    await p.page.wait_for_function("() => !document.querySelector(\"#tag-table tr[data-tag='v1']\")",
                                   timeout=DEADLINE_MS)
    assert dialogs[-1] == f"Purge {traffic.repo}:v1 from the cache?"
    detail = await (await http_session.get(f"{base}/_regproxy/api/repositories/{traffic.repo}")).json()
    assert [t["tag"] for t in detail["tags"]] == ["cold", "multi"]  # (warmed, re-validated)
    assert not is_stored(tmp_path / "data", traffic.big_layer)
    assert is_stored(tmp_path / "data", traffic.shared_layer)  # the hosted image holds it

    # a hosted repository's tag deleted, confirmed
    await p.page.fill("#repo-search", traffic.hosted)
    await p.page.wait_for_function(
        "name => [...document.querySelectorAll('#repo-table tbody tr')].map(r => r.dataset.name)"
        ".join() === name", arg=traffic.hosted, timeout=DEADLINE_MS)
    await table.first.click()
    await p.page.click("#tag-table tr[data-tag='latest'] button.delete", timeout=DEADLINE_MS)
    await p.page.wait_for_function(
        "() => document.querySelector('#repo-notice').textContent.startsWith('deleted')",
        timeout=DEADLINE_MS)
    assert dialogs[-1] == f"Delete the tag {traffic.hosted}:latest?"
    async with http_session.get(f"{base}/v2/{traffic.hosted}/manifests/latest") as r:
        assert r.status == 404

    await p.open("storage")
    assert "1.0 GiB" in await p.page.inner_text("#storage-cards")
    groups = await p.page.locator("#usage-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.group)")
    assert groups == ["(hosted)", "reg.io"]
    assert await p.page.inner_text("#fills-table tbody") == "none"
    await p.page.check("#gc-untagged")
    await p.page.click("#gc-button")
    await p.page.wait_for_selector("#gc-summary", timeout=DEADLINE_MS)
    summary = await p.page.inner_text("#gc-summary")
    # (multi's old index and its two children, and the hosted image whose tag went)
    assert "nothing was deleted" in summary and "4 untagged manifest links" in summary, summary
    # a budget of one byte from now: every cached object goes, each listed by its tag's name
    app[EVICTOR].max_size = 1
    app[EVICTOR].kick()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not any(e["names"] == [f"{traffic.repo}:multi"] for e in (await (await http_session.get(
            f"{base}/_regproxy/api/storage")).json())["evictions"]):
        assert loop.time() < deadline, "no eviction named by its tag"
        await asyncio.sleep(0.1)
    await p.page.reload()
    await p.page.wait_for_selector("body[data-loaded=storage]", timeout=DEADLINE_MS)
    await p.page.wait_for_function(
        "name => document.querySelector('#evictions-table tbody').textContent.includes(name)",
        arg=f"{traffic.repo}:multi", timeout=DEADLINE_MS)
    await p.shot("storage")

    await p.open("config")
    config = await p.page.inner_text("#config-text")
    assert "<redacted>" in config and "hunter2-secret" not in config and "never.io" in config
    keys = await p.page.locator("#sources-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.key)")
    assert keys == ["cache.max_size", "server.listen", "server.workers", "cache.tag_ttl"]  # defaults last
    assert "flag (--listen)" in await p.page.inner_text("#sources-table tr[data-key='server.listen']")
    await p.shot("config")
    assert p.errors == []

    # a phone's width: nothing wider than the screen, the charts shrink to fit
    phone = await browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    m = Page(await phone.new_page(), base)
    await m.open("overview")
    await m.page.locator("#chart-latency canvas").wait_for(timeout=DEADLINE_MS)
    width = await m.page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390, width
    box = await m.page.locator("#chart-requests canvas").bounding_box()
    assert 200 < box["width"] <= 390
    await m.shot("overview-phone")
    await m.open("repositories")
    assert await m.page.evaluate("() => document.documentElement.scrollWidth") <= 390
    await m.shot("repositories-phone")
    assert m.errors == []


async def test_more_tags_than_a_page_in_chromium(browser, http_session, aiohttp_server, tmp_path):
    """A repository with more tags than one answer lists: the page shows the first page
    and how many there are; "More tags" appends the rest, and then goes."""
    from proxy.handlers.console import TAGS_PER_PAGE
    from tests.support.images import push_manifest

    cfg = console_config(tmp_path, "http://127.0.0.1:9")
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    repo = "team/many"
    image = await push_image(http_session, base, repo, "latest", [make_random_bytes(500, seed=3)],
                             schema="oci")
    for i in range(TAGS_PER_PAGE + 2):
        await push_manifest(http_session, base, repo, f"t{i:04d}", image.manifest, image.media_type)
    total = TAGS_PER_PAGE + 3
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    p = Page(await context.new_page(), base)
    await p.open("repositories")
    await p.page.click(f"#repo-table tr[data-name='{repo}']", timeout=DEADLINE_MS)
    rows = "n => document.querySelectorAll('#tag-table tbody tr').length === n"
    await p.page.wait_for_function(rows, arg=TAGS_PER_PAGE, timeout=DEADLINE_MS)
    assert await p.page.inner_text("#tag-more") == f"{TAGS_PER_PAGE} of {total} tags More tags"
    await p.page.click("#more-tags")
    await p.page.wait_for_function(rows, arg=total, timeout=DEADLINE_MS)
    assert await p.page.inner_text("#tag-more") == f"{total} of {total} tags"
    shown = await p.page.locator("#tag-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.tag)")
    assert shown == sorted(shown) and len(set(shown)) == total
    assert await p.page.locator("#repo-images h3").count() == 1  # (one image, shown once)
    await p.shot("repositories-more-tags")
    assert p.errors == []


async def test_more_repositories_than_a_page_in_chromium(browser, http_session, aiohttp_server,
                                                         tmp_path, monkeypatch):
    """More repositories than one answer lists (the cap made small): the page shows the
    first page and how many there are; "More repositories" appends the rest and goes; a
    sort then orders every row shown, the refresh reading both pages again."""
    from proxy.handlers import console
    from tests.support.images import push_manifest

    monkeypatch.setattr(console, "REPOSITORIES_PER_PAGE", 3)
    cfg = console_config(tmp_path, "http://127.0.0.1:9")
    server = await aiohttp_server(create_app(cfg), **runner_kwargs(cfg))
    base = str(server.make_url("")).rstrip("/")
    names = [f"team/r{i}" for i in range(5)]
    for name in names:
        image = await push_image(http_session, base, name, "latest", [name.encode()], schema="oci")
    for tag in ("a", "b"):  # the last by name has the most tags: on the second page
        await push_manifest(http_session, base, names[-1], tag, image.manifest, image.media_type)
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    p = Page(await context.new_page(), base)
    await p.open("repositories")
    shown = "() => [...document.querySelectorAll('#repo-table tbody tr')].map(r => r.dataset.name).join()"
    await p.page.wait_for_function(f"n => ({shown})() === n", arg=",".join(names[:3]),
                                   timeout=DEADLINE_MS)
    assert await p.page.inner_text("#repo-more") == "3 of 5 repositories More repositories"
    assert await p.page.inner_text("#repo-count") == "5 repositories"
    await p.page.click("#more-repos")
    await p.page.wait_for_function(f"n => ({shown})() === n", arg=",".join(names),
                                   timeout=DEADLINE_MS)
    assert await p.page.inner_text("#repo-more") == "5 of 5 repositories"
    await p.page.select_option("#repo-sort", "tags")
    await p.page.wait_for_function(f"n => ({shown})() === n",
                                   arg=",".join([names[-1], *names[:-1]]), timeout=DEADLINE_MS)
    assert await p.page.inner_text("#repo-more") == "5 of 5 repositories"
    await p.shot("repositories-more")
    assert p.errors == []
