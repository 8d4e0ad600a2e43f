// The regproxy console: reads /_regproxy/api/ and draws it. No inline script (CSP), no
// dependencies but the vendored uPlot. Pages are shown by the URL's fragment.
"use strict";
(function () {
  const API = "/_regproxy/api/";
  const state = { window: "15m", charts: {}, timer: null, repoQuery: "", repoSort: "name", repoPages: 1 };

  function $(sel) { return document.querySelector(sel); }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
    return node;
  }
  function bytes(n) {
    if (n == null) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }
  function pct(r) { return r == null ? "-" : (r * 100).toFixed(1) + " %"; }
  function when(t) { return t == null ? "never" : new Date(t * 1000).toLocaleString(); }
  function ms(v) { return v == null ? "-" : (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " ms"; }

  async function api(path) {
    const r = await fetch(API + path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }
  function showError(err) {
    const p = $("#error");
    p.hidden = err == null;
    p.textContent = err == null ? "" : String(err.message || err);
  }
  function stamp() { $("#updated").textContent = "updated " + new Date().toLocaleTimeString(); }

  // -- overview ------------------------------------------------------------------------
  const CHARTS = {
    requests: { series: [{ label: "requests/s", stroke: "#1d6fb8", fill: "rgba(29,111,184,0.12)" }],
                cols: ["requests_per_second"], fmt: (v) => v == null ? "-" : v.toFixed(2) },
    hits: { series: [{ label: "hit ratio", stroke: "#1a7f37", points: { show: true, size: 6, fill: "#fff" } }],
            cols: ["hit_ratio"], fmt: pct, range: [0, 1] },
    bytes: { series: [{ label: "from cache", stroke: "#1a7f37", fill: "rgba(26,127,55,0.12)" },
                      { label: "fetched upstream", stroke: "#c2410c" }],
             cols: ["bytes_cache", "bytes_upstream"], fmt: bytes },
    latency: { series: [{ label: "p50", stroke: "#1d6fb8", points: { show: true, size: 6, fill: "#fff" } },
                        { label: "p99", stroke: "#b91c1c", points: { show: true, size: 6, fill: "#fff" } }],
               cols: ["p50_ms", "p99_ms"], fmt: ms },
  };

  function chartSize(node) {
    const w = Math.max(node.clientWidth || node.parentNode.clientWidth, 240);
    return { width: w, height: w < 500 ? 180 : 220 };
  }

  function drawChart(name, data) {
    const spec = CHARTS[name];
    const node = $("#chart-" + name);
    const columns = [data.series.time, ...spec.cols.map((c) => data.series[c])];
    const points = spec.cols.reduce((n, c) => n + data.series[c].filter((v) => v != null && v !== 0).length, 0);
    node.dataset.points = String(points);
    let chart = state.charts[name];
    if (chart && chart._window === state.window) { chart.setData(columns); return; }
    if (chart) chart.destroy();
    const opts = {
      ...chartSize(node),
      scales: { x: { time: true }, y: spec.range ? { range: spec.range } : {} },
      axes: [{}, { values: (u, vals) => vals.map(spec.fmt), size: 84 }],
      // (hit ratio and latency exist only where there were requests: points, not just lines)
      series: [{}, ...spec.series.map((s) => ({ width: 2, points: { show: false }, value: (u, v) => spec.fmt(v), ...s }))],
      legend: { show: true },
    };
    chart = new uPlot(opts, columns, node);
    chart._window = state.window;
    state.charts[name] = chart;
  }

  function card(label, value) {
    return el("div", { class: "card" }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
  }

  async function loadOverview() {
    const data = await api("overview?window=" + state.window);
    const t = data.totals;
    const saved = t.bytes_cache + t.bytes_upstream ? t.bytes_cache / (t.bytes_cache + t.bytes_upstream) : null;
    $("#totals").replaceChildren(
      card("requests", String(t.requests)), card("hit ratio", pct(t.hit_ratio)),
      card("served from cache", bytes(t.bytes_cache)), card("served via upstream", bytes(t.bytes_upstream)),
      card("bytes saved", pct(saved)), card("fetched from upstreams", bytes(t.upstream_bytes)),
      card("p50 latency", ms(t.p50_ms)), card("p99 latency", ms(t.p99_ms)));
    $("#workers").textContent = data.workers.length + (data.workers.length === 1 ? " worker" : " workers");
    for (const name of Object.keys(CHARTS)) drawChart(name, data);
  }

  // -- upstreams -----------------------------------------------------------------------
  function counts(obj) {
    const parts = Object.entries(obj || {}).map(([k, v]) => k + ": " + v);
    return parts.length ? parts.join(", ") : "none";
  }
  // an upstream's latency (time to its response headers), p50 and p99, one chart each
  function upstreamFigure(u) {
    let fig = document.querySelector("[data-upstream-chart='" + CSS.escape(u.name) + "']");
    if (!fig) {
      fig = el("figure", { "data-upstream-chart": u.name }, el("figcaption", {}), el("div", { class: "chart" }));
      $("#upstream-charts").append(fig);
    }
    return fig;
  }
  function drawUpstreamChart(u) {
    const id = "up-" + u.name;
    const fig = upstreamFigure(u);
    fig.querySelector("figcaption").textContent = u.name + ": upstream latency (ms), p50 " + ms(u.latency.p50) +
      ", p99 " + ms(u.latency.p99) + " over " + u.latency.requests + " requests";
    const node = fig.querySelector(".chart");
    const columns = [u.latency.time, u.latency.p50_ms, u.latency.p99_ms];
    node.dataset.points = String(u.latency.p50_ms.filter((v) => v != null).length);
    let chart = state.charts[id];
    if (chart && chart._window === state.window) { chart.setData(columns); return; }
    if (chart) chart.destroy();
    chart = new uPlot({
      ...chartSize(node), scales: { x: { time: true }, y: {} },
      axes: [{}, { values: (x, vals) => vals.map(ms), size: 84 }],
      series: [{}, ...CHARTS.latency.series.map((s) => ({ width: 2, value: (x, v) => ms(v), ...s }))],
      legend: { show: true } }, columns, node);
    chart._window = state.window;
    chart._node = node;
    state.charts[id] = chart;
  }
  function tokenStatus(a) {
    if (!a.scheme) return "not asked yet";
    if (a.scheme !== "bearer") return a.scheme;
    if (!a.token_expires_at) return "bearer, no token yet";
    const left = a.token_expires_at - Date.now() / 1000;
    return "bearer: " + (left > 0 ? "token cached, " + Math.round(left) + " s left" : "token expired") +
      " (" + a.token_scope + ")";
  }

  async function loadUpstreams() {
    const data = await api("upstreams?window=" + state.window);
    $("#upstreams-table tbody").replaceChildren(...data.upstreams.map((u) => el("tr", {},
      el("td", {}, el("strong", {}, u.name), u.default ? " (default)" : "", el("br"), el("code", {}, u.url)),
      el("td", { class: "state-" + u.state }, u.state.replace("_", " ")),
      el("td", {}, u.breaker),
      el("td", {}, when(u.last_success)),
      el("td", {}, when(u.last_failure), u.last_failure_reason ? el("br") : "", u.last_failure_reason || ""),
      el("td", {}, u.ratelimit_remaining == null ? "-" : u.ratelimit_remaining),
      el("td", {}, counts(u.requests_by_status)),
      el("td", {}, counts(u.errors_by_kind)),
      el("td", { class: "auth" }, tokenStatus(u.auth)))));
    data.upstreams.forEach(upstreamFigure);  // (all laid out first: each chart takes its cell's width)
    for (const u of data.upstreams) drawUpstreamChart(u);
  }

  // -- repositories --------------------------------------------------------------------
  // the list comes a page at a time, by name; the rows read so far are sorted here, the
  // same way the API sorts a page (a refresh reads again as many pages as were shown)
  function repositoriesPage(after) {
    return api("repositories?q=" + encodeURIComponent(state.repoQuery) + "&sort=" + state.repoSort +
      (after == null ? "" : "&after=" + encodeURIComponent(after)));
  }
  const REPO_ORDER = {
    name: () => 0, tags: (a, b) => b.tags - a.tags, served: (a, b) => b.served_bytes - a.served_bytes,
    kind: (a, b) => (a.kind < b.kind ? -1 : a.kind > b.kind ? 1 : 0),
  };
  function showRepositories(rows, last) {
    const order = REPO_ORDER[state.repoSort] || REPO_ORDER.name;
    rows.sort((a, b) => order(a, b) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    $("#repo-count").textContent = last.total + " repositories";
    $("#repo-table tbody").replaceChildren(...rows.map((r) => {
      const row = el("tr", { class: "clickable", "data-name": r.name }, el("td", {}, r.name), el("td", {}, r.kind),
        el("td", {}, r.upstream || "-"), el("td", { class: "num" }, r.tags), el("td", { class: "num" }, bytes(r.served_bytes)));
      row.addEventListener("click", () => loadRepository(r.name).catch(showError));
      return row;
    }));
    const p = $("#repo-more");
    p.replaceChildren(rows.length + " of " + last.total + " repositories" +
      (last.truncated && state.repoSort !== "name" ? " (sorted among those shown)" : ""));
    if (!last.truncated) return;
    const b = el("button", { type: "button", id: "more-repos" }, "More repositories");
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        const next = await repositoriesPage(last.next);
        state.repoPages += 1;
        showRepositories(rows.concat(next.repositories), next);
      } catch (err) { b.disabled = false; showError(err); }
    });
    p.append(" ", b);
  }
  async function loadRepositories() {
    let data = await repositoriesPage(null);
    let rows = data.repositories, pages = 1;
    while (pages < state.repoPages && data.truncated) {
      data = await repositoriesPage(data.next);
      rows = rows.concat(data.repositories);
      pages += 1;
    }
    state.repoPages = pages;
    await loadWarms();
    showRepositories(rows, data);
  }

  // a repository's answer: a page of its tags (after: the last tag of the page before)
  function repositoryPage(name, after) {
    return api("repositories/" + name.split("/").map(encodeURIComponent).join("/") +
      (after == null ? "" : "?tags_after=" + encodeURIComponent(after)));
  }
  function tagRow(data, t) {
    return el("tr", { "data-tag": t.tag }, el("td", {}, t.tag), el("td", {}, el("code", {}, t.digest)),
      el("td", {}, t.media_type || "-"), el("td", { class: "num" }, bytes(t.size)), el("td", {}, t.platforms.join(", ") || "-"),
      el("td", { class: "tag-state" }, t.state || "-"), el("td", {}, t.state ? when(t.validated_at) : "-"),
      el("td", {}, when(t.last_pulled)), el("td", { class: "num" }, t.pulls == null ? "-" : String(t.pulls)),
      el("td", {}, ...(data.kind === "cached" ? [revalidateButton(data.name, t.tag), " ", purgeButton(data.name, t.tag)]
        : [deleteButton(data.name, t.tag)])));
  }
  // the page's images not shown yet, each with its layers
  function imageSections(data) {
    // what each image is called: its tags, or its platform in an index
    const names = {};
    const label = (d, n) => { (names[d] = names[d] || []).push(n); };
    for (const t of data.tags) label(t.digest, t.tag);
    for (const img of data.images) for (const p of img.platforms || []) label(p.digest, p.platform || "?");
    const shown = new Set([...document.querySelectorAll("#repo-images [data-digest]")].map((n) => n.dataset.digest));
    return data.images.filter((i) => i.layers && !shown.has(i.digest)).map((img) => el("div", { "data-digest": img.digest },
      el("h3", {}, (names[img.digest] || ["untagged"]).join(", ") + " ", el("code", {}, img.digest.slice(0, 19)),
        " (" + bytes(img.size) + ")"),
      el("div", { class: "scroll" }, el("table", { class: "layers" },
        el("thead", {}, el("tr", {}, el("th", {}, "Layer"), el("th", {}, "Size"), el("th", {}, "Also in"))),
        el("tbody", {}, ...img.layers.map((l) => el("tr", {}, el("td", {}, el("code", {}, l.digest)),
          el("td", { class: "num" }, bytes(l.size)), el("td", {}, l.shared_with.join(", ") || "-"))))))));
  }
  // "N of M tags" and, while there are more, the button that reads the next page
  function moreTags(data) {
    const shown = document.querySelectorAll("#tag-table tbody tr").length;
    const p = $("#tag-more");
    p.replaceChildren(shown + " of " + data.tags_total + " tags");
    if (!data.tags_truncated) return;
    const b = el("button", { type: "button", id: "more-tags" }, "More tags");
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        const next = await repositoryPage(data.name, data.tags_next);
        $("#tag-table tbody").append(...next.tags.map((t) => tagRow(next, t)));
        $("#repo-images").append(...imageSections(next));
        moreTags(next);
      } catch (err) { b.disabled = false; showError(err); }
    });
    p.append(" ", b);
  }

  async function loadRepository(name) {
    const data = await repositoryPage(name, null);
    const tags = el("table", { id: "tag-table" }, el("thead", {}, el("tr", {}, el("th", {}, "Tag"), el("th", {}, "Digest"),
      el("th", {}, "Media type"), el("th", {}, "Size"), el("th", {}, "Platforms"),
      el("th", {}, "State"), el("th", {}, "Validated"), el("th", {}, "Last pulled"), el("th", {}, "Pulls"))),
      el("tbody", {}, ...data.tags.map((t) => tagRow(data, t))));
    $("#repo-detail").replaceChildren(el("h2", {}, data.name + " (" + data.kind + (data.upstream ? ", from " + data.upstream : "") + ")"),
      el("div", { class: "scroll" }, tags), el("p", { id: "tag-more", class: "muted" }), el("div", { id: "repo-images" }));
    $("#repo-images").append(...imageSections(data));
    moreTags(data);
  }

  // an action on a repository's tag, after a confirmation; then the lists are read again
  // an action's POST (a JSON body); its answer, or an Error with the API's message
  async function post(path, body) {
    const r = await fetch(API + path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" }, body: JSON.stringify(body) });
    const answer = await r.json();
    if (!r.ok) throw new Error(answer.errors ? answer.errors[0].message : "HTTP " + r.status);
    return answer;
  }
  function actionButton(label, cls, question, name, action, body, done) {
    const b = el("button", { type: "button", class: cls }, label);
    b.addEventListener("click", async () => {
      if (!window.confirm(question)) return;
      try {
        const answer = await post("repositories/" + name.split("/").map(encodeURIComponent).join("/") + "/" + action,
          body);
        $("#repo-notice").textContent = done(answer);
        await loadRepositories();
        await loadRepository(name);
      } catch (err) { showError(err); }
    });
    return b;
  }
  // a cached image's purge: the tag and what only it used
  function purgeButton(name, tag) {
    return actionButton("Purge", "purge", "Purge " + name + ":" + tag + " from the cache?", name, "purge",
      { reference: tag }, (a) => "purged " + a.purged + ": " + a.removed.length + " objects, " + bytes(a.bytes));
  }
  // a cached tag asked of its upstream now, whatever its TTL
  function revalidateButton(name, tag) {
    return actionButton("Re-validate", "revalidate", "Ask the upstream what " + name + ":" + tag + " is now?", name,
      "revalidate", { tag: tag }, (a) => "revalidated " + a.revalidated + ": " +
        (a.changed ? "changed to " + a.digest : a.previous ? "unchanged" : "now " + a.digest));
  }
  // a hosted repository's tag (the manifest stays until garbage collection)
  function deleteButton(name, tag) {
    return actionButton("Delete tag", "delete", "Delete the tag " + name + ":" + tag + "?", name, "delete-tag",
      { tag: tag }, (a) => "deleted " + a.deleted);
  }

  // warming an image in the background; the jobs (this worker's) are listed under the form
  async function loadWarms() {
    const data = await api("warm");
    const rows = data.warms.map((w) => el("tr", { "data-image": w.image, "data-state": w.state }, el("td", {}, w.image),
      el("td", { class: "state-" + (w.state === "failed" ? "failing" : w.state === "done" ? "healthy" : "recovering") }, w.state),
      el("td", { class: "num" }, w.blobs + " / " + (w.blobs_total == null ? "?" : w.blobs_total)),
      el("td", { class: "num" }, bytes(w.bytes)), el("td", {}, when(w.started)), el("td", {}, w.error || "")));
    $("#warm-table").hidden = rows.length === 0;
    $("#warm-table tbody").replaceChildren(...rows);
    if (data.warms.some((w) => w.state === "running")) setTimeout(() => loadWarms().catch(showError), 1000);
  }
  async function startWarm(ev) {
    ev.preventDefault();
    const image = $("#warm-image").value.trim();
    if (!image) return;
    try {
      const a = await post("warm", { image: image });
      $("#repo-notice").textContent = "warming " + a.started;
      await loadWarms();
    } catch (err) { showError(err); }
  }

  // -- storage -------------------------------------------------------------------------
  async function loadStorage() {
    const s = await api("storage");
    $("#storage-cards").replaceChildren(
      card("cached", bytes(s.cached_bytes)), card("evictable", bytes(s.evictable_bytes)),
      card("budget", s.budget ? bytes(s.budget) : "none"), card("hosted", bytes(s.hosted_bytes)),
      card("disk free", s.disk ? bytes(s.disk.free) : "-"), card("disk size", s.disk ? bytes(s.disk.size) : "-"),
      card("measured", s.measured_at ? new Date(s.measured_at * 1000).toLocaleTimeString() : "not yet"));
    const share = s.budget && s.evictable_bytes != null ? Math.min(100, 100 * s.evictable_bytes / s.budget) : 0;
    $("#storage-bar").style.width = share.toFixed(1) + "%";
    const groups = Object.entries(s.by_upstream);
    $("#usage-table tbody").replaceChildren(...(groups.length ? groups.map(([g, u]) => el("tr", { "data-group": g },
      el("td", {}, g), el("td", { class: "num" }, u.objects), el("td", { class: "num" }, bytes(u.bytes))))
      : [el("tr", {}, el("td", { colspan: "3" }, "nothing stored"))]));
    $("#usage-note").textContent = "stored in all: " + bytes(s.stored_bytes) + " in " + s.stored_objects +
      " objects (content two upstreams share counts in each)" + (s.index_complete ? "" : "; only the first 2000 repositories read");
    $("#evictions-table tbody").replaceChildren(...(s.evictions.length ? s.evictions.map((e) => el("tr", {},
      el("td", {}, when(e.time)), el("td", {}, e.names.join(", ")), el("td", {}, el("code", {}, e.digest)),
      el("td", { class: "num" }, bytes(e.bytes))))
      : [el("tr", {}, el("td", { colspan: "4" }, "none"))]));
    // (the meters' widths are set through the CSSOM: a style attribute would break the CSP)
    const fillRow = (f) => {
      const bar = el("div");
      bar.style.width = (f.size ? Math.min(100, 100 * f.bytes / f.size) : 0).toFixed(1) + "%";
      return el("tr", { "data-digest": f.digest }, el("td", {}, f.names.join(", ")), el("td", {}, el("code", {}, f.digest)),
        el("td", { class: "num" }, bytes(f.bytes) + " / " + (f.size == null ? "?" : bytes(f.size))),
        el("td", {}, el("div", { class: "meter" }, bar)));
    };
    $("#fills-table tbody").replaceChildren(...(s.fills.length ? s.fills.map(fillRow)
      : [el("tr", {}, el("td", { colspan: "4" }, "none"))]));
  }

  async function gcDryRun() {
    const g = await post("storage/gc-dry-run", { delete_untagged: $("#gc-untagged").checked });
    $("#gc-result").replaceChildren(
      el("p", { id: "gc-summary" }, "GC would remove " + g.blobs + " objects, " + bytes(g.bytes) + ", and " +
        g.untagged_manifests + " untagged manifest links; it would keep " + g.kept + " (nothing was deleted; " +
        g.seconds + " s)"),
      ...(g.blob_list.length ? [el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Object"), el("th", { class: "num" }, "Size"))),
        el("tbody", {}, ...g.blob_list.map((b) => el("tr", {}, el("td", {}, el("code", {}, b.digest)), el("td", { class: "num" }, bytes(b.bytes)))))))] : []));
  }

  async function loadConfig() {
    const c = await api("config");
    $("#config-text").textContent = JSON.stringify(c.config, null, 2);
    // the keys set somewhere first, then the defaults
    const keys = Object.entries(c.sources).sort((a, b) => (a[1] === "default") - (b[1] === "default") || (a[0] < b[0] ? -1 : 1));
    $("#sources-table tbody").replaceChildren(...(keys.length ? keys.map(([k, src]) => el("tr", { "data-key": k, class: src === "default" ? "muted" : "" },
      el("td", {}, el("code", {}, k)), el("td", {}, src)))
      : [el("tr", {}, el("td", { colspan: "2" }, "not recorded (a configuration built in code)"))]));
  }

  // -- navigation ----------------------------------------------------------------------
  const LOADERS = { overview: loadOverview, upstreams: loadUpstreams, repositories: loadRepositories,
                    storage: loadStorage, config: loadConfig };
  function page() { const p = location.hash.slice(1); return LOADERS[p] ? p : "overview"; }

  async function refresh() {
    const p = page();
    try { await LOADERS[p](); stamp(); showError(null); } catch (err) { showError(err); }
    document.body.dataset.loaded = p;
  }

  function show() {
    const p = page();
    for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== "page-" + p;
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.page === p);
    delete document.body.dataset.loaded;
    clearInterval(state.timer);
    state.timer = setInterval(refresh, state.window === "15m" || p !== "overview" ? 10000 : 60000);
    refresh();
  }

  function start() {
    window.addEventListener("hashchange", show);
    for (const b of document.querySelectorAll("[data-window]")) {
      b.addEventListener("click", () => {
        state.window = b.dataset.window;
        for (const o of document.querySelectorAll("[data-window]")) o.classList.toggle("on", o === b);
        show();
      });
    }
    let debounce = null;
    $("#repo-search").addEventListener("input", (e) => {
      clearTimeout(debounce);
      debounce = setTimeout(() => { state.repoQuery = e.target.value; state.repoPages = 1; refresh(); }, 150);
    });
    $("#warm-form").addEventListener("submit", startWarm);
    $("#gc-button").addEventListener("click", () => gcDryRun().catch(showError));
    $("#repo-sort").addEventListener("change", (e) => { state.repoSort = e.target.value; refresh(); });
    window.addEventListener("resize", () => {
      for (const [name, chart] of Object.entries(state.charts)) chart.setSize(chartSize(chart._node || $("#chart-" + name)));
    });
    show();
  }
  document.addEventListener("DOMContentLoaded", start);
})();
