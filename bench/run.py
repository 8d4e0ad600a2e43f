"""Side-by-side benchmark: regproxy vs distribution (proxy mode) vs nginx proxy_cache.

    python bench/run.py [--quick] [--systems regproxy,distribution,nginx] [--out FILE] [--keep]
    python bench/run.py --scenarios wan     # image pulls through a WAN-shaped hop

See bench/README.md for what is measured and how each system is configured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.load import MANIFEST_ACCEPT, run_ab, run_load, run_wrk  # noqa: E402
from bench.seed import MiB, Seeded, Sizes, WanImage, seed, seed_wan  # noqa: E402
from bench.systems import (  # noqa: E402
    NGINX_BINARY,
    CountingHop,
    Distribution,
    Managed,
    NginxCache,
    Regproxy,
    UpstreamCounter,
    WanHop,
)
from tests.support.registry import REGISTRY_BINARY, RegistryProcess  # noqa: E402

SYSTEMS = ("regproxy", "distribution", "nginx")
SCENARIOS = ("burst", "single", "pull", "warm", "manifests")  # on loopback: the default
WAN = "wan"  # image pulls through the WAN hop (bench/wanhop.py)
ALL_SCENARIOS = (*SCENARIOS, WAN)
DIRECT = "direct"  # the WAN hop's port for the client pulling straight from the origin
WAN_CONCURRENCY = 3  # docker's and containerd's max-concurrent-downloads
WAN_WARM_PULLS = 3
WAN_QUIET_WAIT = 5.0  # the WAN pulls are bound by the modelled link, less by the CPUs
ORIGIN = "origin"
GiB = 1 << 30
BURST_CLIENTS = 16
PULL_CONCURRENCY = 6
WARM_CLIENTS = (1, 8, 32)
LOAD_CONNECTIONS = 64


class Deadline(Exception):
    """The whole run took longer than its bound."""


@contextlib.contextmanager
def bounded_run(prefix: str, seconds: int, keep: bool) -> Iterator[Path]:
    """A benchmark run's work directory, and its bound: SIGTERM raises KeyboardInterrupt and
    ``seconds`` later SIGALRM raises :class:`Deadline`, so that the run's own cleanup stops
    every process it started. The directory is deleted afterwards unless ``keep``."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGALRM:
            raise Deadline("the benchmark exceeded its time bound")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(seconds)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        signal.alarm(0)
        if keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# results and the table
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    key: str
    label: str
    spec: str  # format spec of the value


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    legend: list[str] = field(default_factory=list)  # how to read some rows

    def row(self, key: str, label: str, spec: str) -> None:
        if all(r.key != key for r in self.rows):
            self.rows.append(Row(key, label, spec))

    def set(self, key: str, column: str, value: Any) -> None:
        self.values.setdefault(key, {})[column] = value

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def table(self, systems: list[str]) -> str:
        ratio_cols = [o for o in ("distribution", "nginx") if o in systems and "regproxy" in systems]
        head = ["figure", *systems, "origin (direct)", *(f"regproxy/{o}" for o in ratio_cols)]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", *["---:"] * (len(head) - 1)]) + "|"]
        for row in self.rows:
            vals = self.values.get(row.key, {})
            if not vals:  # a scenario left out with --scenarios
                continue
            cells = [row.label, *(_fmt(vals.get(c), row.spec) for c in [*systems, ORIGIN])]
            for other in ratio_cols:
                a, b = vals.get("regproxy"), vals.get(other)
                ok = isinstance(a, int | float) and isinstance(b, int | float) and b != 0
                cells.append(f"{a / b:.2f}" if ok else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def scratch(directory: Path, size: int) -> None:
    """Write and delete ``size`` bytes so that the next fill gets pages the VM already has.
    Earlier dirty pages are written back first, so that their writeback does not run during
    the next scenario."""
    os.sync()
    path = directory / "scratch"
    chunk = b"\x00" * MiB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // MiB):
            os.write(fd, chunk)
    finally:
        os.close(fd)
        os.unlink(path)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_quiet(res: Results, label: str, max_wait: float = 20.0, limit: float = 0.15) -> None:
    """Wait until the machine is (nearly) idle: other sessions may share it. Notes it if not."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = _cpu_times()
        time.sleep(0.5)
        busy1, total1 = _cpu_times()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        if busy < limit:
            return
        if time.monotonic() > deadline:
            res.note(f"machine {busy:.0%} busy before {label} (another session, or the system's own "
                     "background work): its figures may be low")
            return


@contextlib.contextmanager
def counted(hop: UpstreamCounter, system: str) -> Iterator[dict[str, Any]]:
    """Upstream traffic (through ``system``'s hop) of the block, background fills included."""
    hop.wait_idle()
    mark = hop.mark(system)
    out: dict[str, Any] = {}
    yield out
    if not hop.wait_idle(120):
        out["busy"] = True
    time.sleep(0.1)
    out["count"] = hop.count_since(system, mark)


def log_problems(sut: Managed) -> list[str]:
    """Warning/error lines from the system's own logs."""
    paths = [sut.log_path]
    if isinstance(sut, NginxCache):
        paths.append(sut.workdir / "error.log")
    bad = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                low = line.lower()
                if any(w in low for w in ("warn", "error", "traceback", "exception", "crit", "alert")):
                    bad.append(line.strip())
    return bad


# ---------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------
def image_bytes(image: Any) -> int:
    return len(image.manifest) + image.config.size + sum(layer.size for layer in image.layers)


def origin_baseline(origin: RegistryProcess, hop: CountingHop, seeded: Seeded, sizes: Sizes, res: Results,
                    work: Path, scenarios: set[str]) -> None:
    print("== origin (direct)", flush=True)
    wait_quiet(res, "origin baseline")
    times = []
    for many in seeded.many if "pull" in scenarios else []:
        r = run_load({"kind": "pull", "base": origin.url, "repo": many.repo, "ref": many.tag,
                      "concurrency": PULL_CONCURRENCY})
        if r.get("error_count") or r.get("error"):
            res.note(f"origin: pull errors {r}")
        times.append(r["seconds"])
    if times:
        res.set("pull.time", ORIGIN, statistics.median(times))
    times = []
    for many in seeded.many if "pull" in scenarios else []:  # through the relay the systems use
        r = run_load({"kind": "pull", "base": hop.hop_url(ORIGIN), "repo": many.repo, "ref": many.tag,
                      "concurrency": PULL_CONCURRENCY})
        times.append(r["seconds"])
    if times:
        res.set("pull.time_hop", ORIGIN, statistics.median(times))
    if "burst" in scenarios:  # straight from the origin (which holds every blob): the floor
        cold = next(iter(seeded.cold.values())).layers[0]
        r = run_load({"kind": "burst", "url": f"{origin.url}/v2/bench/cold/blobs/{cold.digest}",
                      "clients": BURST_CLIENTS})
        res.set("burst.ttfb", ORIGIN, r["ttfb_median"] * 1000)
        res.set("burst.ttfb_join", ORIGIN, r["ttfb_joiners_median"] * 1000)
        res.set("burst.total", ORIGIN, r["total"])
        res.set("burst.err", ORIGIN, r["errors"])
    big = seeded.big.layers[0]
    big_url = f"{origin.url}/v2/{seeded.big.repo}/blobs/{big.digest}"
    if "single" in scenarios:
        r = run_load({"kind": "burst", "url": big_url, "clients": 1})
        res.set("single.mibs", ORIGIN, big.size / MiB / r["clients"][0]["done"])
    if "warm" in scenarios:
        warm(big_url, ORIGIN, sizes, res)
    if "manifests" in scenarios:
        manifests(origin.url, ORIGIN, None, seeded, sizes, res, work)


def manifests(base: str, column: str, hop: CountingHop | None, seeded: Seeded, sizes: Sizes,
              res: Results, work: Path) -> None:
    repo = seeded.small_repo
    tags = [f"/v2/{repo}/manifests/{img.tag}" for img in seeded.small]
    digests = [f"/v2/{repo}/manifests/{img.digest}" for img in seeded.small]
    warmed = run_load({"kind": "requests", "base": base, "accept": MANIFEST_ACCEPT,
                     "items": [("GET", p) for p in tags + digests]})
    if set(warmed["statuses"]) != {"200"}:
        res.note(f"{column}: manifest warm-up statuses {warmed['statuses']}")
    for method, key in (("GET", "man.get"), ("HEAD", "man.head")):
        ctx = counted(hop, column) if hop is not None else contextlib.nullcontext({})
        runs = []
        with ctx as up:
            for _ in range(sizes.windows):
                if method == "GET":  # wrk, round robin over every tag
                    runs.append(run_wrk(base, method, tags, work, connections=LOAD_CONNECTIONS,
                                        duration=sizes.wrk_duration))
                else:  # ab (wrk cannot do HEAD), one digest
                    runs.append(run_ab(base, method, digests[0], work, connections=LOAD_CONNECTIONS,
                                       duration=sizes.wrk_duration))
        res.set(f"{key}.rps", column, statistics.median(w["rps"] for w in runs))
        res.set(f"{key}.p99", column, statistics.median(w["p99_us"] for w in runs) / 1000)
        errors = sum(w["errors"] for w in runs)
        res.set(f"{key}.err", column, errors)
        if errors:
            res.note(f"{column}: {method} manifests: load generator errors {runs}")
        if "count" in up:
            res.set(f"{key}.up", column, up["count"].requests / (sizes.windows * sizes.wrk_duration))


def warm(url: str, column: str, sizes: Sizes, res: Results) -> None:
    """Throughput of the warm big blob at 1, 8 and 32 clients (median of the windows)."""
    for n in WARM_CLIENTS:
        runs = [run_load({"kind": "throughput", "url": url, "clients": n, "duration": sizes.duration})
                for _ in range(sizes.windows)]
        res.set(f"warm.{n}", column, statistics.median(r["bytes_per_s"] for r in runs) / GiB)
        errors = sum(r["error_count"] for r in runs)
        if errors:
            res.note(f"{column}: warm x{n}: {errors} errors, e.g. {runs[0]['errors']}")
        print(f"  warm x{n}: {res.values[f'warm.{n}'][column]:.2f} GiB/s", flush=True)


def bench_system(name: str, sut: Managed, hop: CountingHop, seeded: Seeded, sizes: Sizes,
                 res: Results, work: Path, scenarios: set[str]) -> None:
    base = sut.url
    big = seeded.big.layers[0]
    big_url = f"{base}/v2/{seeded.big.repo}/blobs/{big.digest}"
    if "burst" in scenarios:
        burst(name, base, hop, seeded, sizes, res, work)
    if "single" in scenarios:
        single(name, big_url, hop, seeded, sizes, res, work)
    elif "warm" in scenarios:  # the warm runs need the big blob cached
        run_load({"kind": "burst", "url": big_url, "clients": 1})
    if "pull" in scenarios:
        pull(name, base, hop, seeded, sizes, res, work)
    if "warm" in scenarios:
        os.sync()  # nginx and distribution do not fsync their fills: write them back now, not mid-run
        wait_quiet(res, f"{name} warm blob")
        with counted(hop, name) as up:
            warm(big_url, name, sizes, res)
        res.set("warm.up", name, up["count"].requests)
    if "manifests" in scenarios:
        wait_quiet(res, f"{name} manifests")
        manifests(base, name, hop, seeded, sizes, res, work)
        print(f"  manifests: GET tag {res.values['man.get.rps'][name]:.0f} req/s, "
              f"HEAD digest {res.values['man.head.rps'][name]:.0f} req/s", flush=True)
    res.set("mem", name, sut.peak_rss_kib() / 1024)


def burst(name: str, base: str, hop: CountingHop, seeded: Seeded, sizes: Sizes, res: Results,
          work: Path) -> None:
    """16 clients at once on a cold blob."""
    cold = seeded.cold[name].layers[0]
    wait_quiet(res, f"{name} cold burst")
    scratch(work, sizes.scratch)
    with counted(hop, name) as up:
        r = run_load({"kind": "burst", "url": f"{base}/v2/bench/cold/blobs/{cold.digest}",
                      "clients": BURST_CLIENTS})
    c = up["count"]
    res.set("burst.upreq", name, c.requests)
    res.set("burst.upbytes", name, c.bytes / cold.size)
    res.set("burst.ttfb", name, r["ttfb_median"] * 1000 if r["ttfb_median"] is not None else None)
    res.set("burst.ttfb_join", name,
            r["ttfb_joiners_median"] * 1000 if r["ttfb_joiners_median"] is not None else None)
    res.set("burst.total", name, r["total"])
    res.set("burst.err", name, r["errors"])
    if r["errors"]:
        bad = [cl for cl in r["clients"] if not cl["complete"] or cl["status"] != 200]
        res.note(f"{name}: cold burst: {r['errors']} failed clients, e.g. {bad[:2]}")
    print(f"  burst: {c.requests} upstream requests, {c.bytes / cold.size:.2f}x bytes, "
          f"ttfb p50 {r['ttfb_median']}, total {r['total']:.2f}s", flush=True)


def single(name: str, big_url: str, hop: CountingHop, seeded: Seeded, sizes: Sizes, res: Results,
           work: Path) -> None:
    """One client on the cold big layer (which also warms it)."""
    big = seeded.big.layers[0]
    wait_quiet(res, f"{name} single cold stream")
    scratch(work, sizes.scratch)
    with counted(hop, name) as up:
        r = run_load({"kind": "burst", "url": big_url, "clients": 1})
    client = r["clients"][0]
    if not client["complete"] or client["bytes"] != big.size:
        res.note(f"{name}: cold single stream failed: {client}")
    res.set("single.mibs", name, big.size / MiB / client["done"] if client["done"] else None)
    res.set("single.upbytes", name, up["count"].bytes / big.size)
    print(f"  single cold stream: {big.size / MiB / client['done']:.0f} MiB/s", flush=True)


def pull(name: str, base: str, hop: CountingHop, seeded: Seeded, sizes: Sizes, res: Results,
         work: Path) -> None:
    """Cold pull of the many-layer image: one pull of each cold copy, the median reported
    (a single pull of ~0.2 s moves by a third between runs on a shared VM)."""
    times: list[float] = []
    requests: list[int] = []
    ratios: list[float] = []
    for many in seeded.many:
        wait_quiet(res, f"{name} cold pull")
        scratch(work, sizes.scratch)
        with counted(hop, name) as up:
            r = run_load({"kind": "pull", "base": base, "repo": many.repo, "ref": many.tag,
                          "concurrency": PULL_CONCURRENCY})
        if r.get("error") or r.get("error_count"):
            res.note(f"{name}: cold pull errors: {r}")
        times.append(r["seconds"])
        requests.append(up["count"].requests)
        ratios.append(up["count"].bytes / image_bytes(many))
    if len(set(requests)) > 1:
        res.note(f"{name}: cold pulls made different numbers of upstream requests: {requests}")
    res.set("pull.upreq", name, max(requests))
    res.set("pull.upbytes", name, max(ratios))
    res.set("pull.time", name, statistics.median(times))
    for key, ref in (("pull.vs", "pull.time"), ("pull.vs_hop", "pull.time_hop")):
        ref_time = res.values.get(ref, {}).get(ORIGIN)
        if ref_time:
            res.set(key, name, statistics.median(times) / ref_time)
    print(f"  cold pull: {max(requests)} upstream requests, "
          f"{' / '.join(f'{t:.2f}' for t in times)} s", flush=True)


def define_rows(res: Results, sizes: Sizes) -> None:
    cold, big, n, n_tags = sizes.cold // MiB, sizes.big // MiB, sizes.layers, sizes.tags
    b = f"{BURST_CLIENTS} clients at once, cold {cold} MiB blob"
    for key, label, spec in [
        ("burst.upreq", f"{b}: upstream requests ↓", "d"),
        ("burst.upbytes", f"{b}: upstream bytes ÷ blob size ↓", ".2f"),
        ("burst.ttfb", f"{b}: TTFB median, ms ↓", ".0f"),
        ("burst.ttfb_join", f"{b}: TTFB median of joiners, ms ↓", ".0f"),
        ("burst.total", f"{b}: all done, s ↓", ".2f"),
        ("burst.err", f"{b}: failed clients ↓", "d"),
        ("single.mibs", f"single cold stream ({big} MiB), MiB/s ↑", ".0f"),
        ("single.upbytes", "single cold stream: upstream bytes ÷ blob size ↓", ".2f"),
        ("pull.upreq", f"cold pull, {n} x 1 MiB layers, {PULL_CONCURRENCY} at a time: upstream requests ↓",
         "d"),
        ("pull.upbytes", "cold pull: upstream bytes ÷ image size ↓", ".2f"),
        ("pull.time", "cold pull: total (median of the pulls), s ↓", ".2f"),
        ("pull.vs", "cold pull ÷ same pull straight from origin ↓", ".2f"),
        ("pull.time_hop", "same pull from origin through the counting hop only, s", ".2f"),
        ("pull.vs_hop", "cold pull ÷ same pull through the counting hop only ↓", ".2f"),
        *((f"warm.{c}", f"warm {big} MiB blob, {c} client{'s' if c > 1 else ''}, GiB/s ↑", ".2f")
          for c in WARM_CLIENTS),
        ("warm.up", "warm blob runs: upstream requests ↓", "d"),
        ("man.get.rps", f"GET manifest by tag ({LOAD_CONNECTIONS} conns, wrk, {n_tags} tags), req/s ↑",
         ".0f"),
        ("man.get.p99", "GET manifest by tag: p99 latency, ms ↓", ".1f"),
        ("man.get.err", "GET manifest by tag: errors ↓", "d"),
        ("man.get.up", "GET manifest by tag: upstream requests per second of load ↓", ".1f"),
        ("man.head.rps", f"HEAD manifest by digest ({LOAD_CONNECTIONS} conns, ab), req/s ↑", ".0f"),
        ("man.head.p99", "HEAD manifest by digest: p99 latency, ms ↓", ".1f"),
        ("man.head.err", "HEAD manifest by digest: errors ↓", "d"),
        ("man.head.up", "HEAD manifest by digest: upstream requests per second of load ↓", ".1f"),
        ("mem", "peak memory (VmHWM, all processes), MiB ↓", ".0f"),
    ]:
        res.row(key, label, spec)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def make_system(name: str, workdir: Path, upstream: str, regproxy_args: list[str]) -> Managed:
    factories: dict[str, Callable[[], Managed]] = {
        "regproxy": lambda: Regproxy(workdir, upstream, extra_args=regproxy_args),
        "distribution": lambda: Distribution(workdir, upstream),
        "nginx": lambda: NginxCache(workdir, upstream),
    }
    return factories[name]()


@contextlib.contextmanager
def running(name: str, sut: Managed, res: Results) -> Iterator[None]:
    """Run a system for the block: a failed scenario and the system's warnings become notes."""
    sut.start()
    try:
        yield
    except (RuntimeError, OSError, KeyError, ValueError, TypeError):
        res.note(f"{name}: scenario failed: {traceback.format_exc(limit=3)}")
    finally:
        problems = log_problems(sut)
        sut.stop()
    if problems:
        res.note(f"{name}: {len(problems)} warning/error log lines, e.g.: "
                 + " || ".join(p[:300] for p in problems[:3]))


def run(systems: list[str], sizes: Sizes, work: Path, res: Results, regproxy_args: list[str],
        scenarios: set[str], wan_shape: dict[str, float], quick: bool) -> None:
    define_rows(res, sizes)
    with contextlib.ExitStack() as stack:
        origin = RegistryProcess(work / "origin")
        origin.start()
        stack.callback(origin.stop)
        if scenarios & set(SCENARIOS):
            t = time.monotonic()
            seeded = seed(origin.url, work, sizes, systems)
            print(f"seeded the origin in {time.monotonic() - t:.1f}s", flush=True)
            hop = CountingHop(work / "hop", origin.port, [*systems, ORIGIN])
            hop.start()
            stack.callback(hop.stop)
            origin_baseline(origin, hop, seeded, sizes, res, work, scenarios)
            for name in systems:
                print(f"== {name}", flush=True)
                sut = make_system(name, work / name, hop.hop_url(name), regproxy_args)
                with running(name, sut, res):
                    bench_system(name, sut, hop, seeded, sizes, res, work, scenarios)
        if WAN in scenarios:
            run_wan(systems, origin, quick, wan_shape, res, work, regproxy_args, stack)


# ---------------------------------------------------------------------------------------
# WAN scenarios: image pulls through the WAN hop
# ---------------------------------------------------------------------------------------
def run_wan(systems: list[str], origin: RegistryProcess, quick: bool, shape: dict[str, float], res: Results,
            work: Path, regproxy_args: list[str], stack: contextlib.ExitStack) -> None:
    """Cold and warm pulls of each WAN image through each system, which reaches the origin
    through the WAN hop, and the same pulls straight through the hop (direct)."""
    columns = [*systems, DIRECT]
    t = time.monotonic()
    images = seed_wan(origin.url, work, quick, columns)
    print(f"seeded the WAN images in {time.monotonic() - t:.1f}s", flush=True)
    define_wan_rows(res, images)
    hop = WanHop(work / "wanhop", origin.port, columns, **shape)
    hop.start()
    stack.callback(hop.stop)
    print(f"== WAN hop: {hop.shape}\n== direct (through the WAN hop)", flush=True)
    for image in images:
        wan_direct(hop, image, res, work)
    for name in systems:
        print(f"== {name} (WAN)", flush=True)
        sut = make_system(name, work / f"wan-{name}", hop.hop_url(name), regproxy_args)
        with running(name, sut, res):
            for image in images:
                wan_system(name, sut.url, hop, image, res, work)
    status = hop.status()
    relayed = sum(lst["bytes"] for lst in status["listeners"].values())
    res.legend.append(
        f"WAN rows: client -> system -> WAN hop ({hop.shape}) -> origin; in them the 'origin (direct)' "
        f"column is the same pull straight through the same hop (median of 3 pulls; 1 for images "
        f"over 256 MiB), and '÷ direct' divides by it. Pulls as docker and containerd do them: "
        f"manifest, config, then layers {WAN_CONCURRENCY} at a time on pooled connections. Cold: "
        f"one pull of the system's own fresh copy of the image; warm: {WAN_WARM_PULLS} pulls right "
        f"after it, median time, most upstream requests, bytes and connections. Upstream requests and body "
        f"bytes are counted at the hop. The hop relayed {relayed / GiB:.1f} GiB of bodies on "
        f"{status['cpu_s']:.1f} s of CPU.")


def define_wan_rows(res: Results, images: list[WanImage]) -> None:
    for image in images:
        label = f"WAN {image.label}"
        for phase, what in (("cold", "cold pull"), ("warm", "warm pull")):
            res.row(f"wan.{image.key}.{phase}.time", f"{label}: {what}, s ↓", ".2f")
            res.row(f"wan.{image.key}.{phase}.vs", f"{label}: {what} ÷ direct ↓", ".2f")
            res.row(f"wan.{image.key}.{phase}.upreq", f"{label}: {what}: upstream requests ↓", "d")
            res.row(f"wan.{image.key}.{phase}.upbytes", f"{label}: {what}: upstream bytes ÷ image size ↓",
                    ".3f")  # (the target is <= 1.00: a third digit shows what rounding hides)
            res.row(f"wan.{image.key}.{phase}.upconn", f"{label}: {what}: upstream connections opened ↓",
                    "d")


@contextlib.contextmanager
def wan_counted(hop: WanHop, column: str) -> Iterator[dict[str, Any]]:
    """:func:`counted`, plus the connections the column opened to the hop (each costs a
    round trip before it carries anything)."""
    before = hop.status()["listeners"][column]["connections"]
    with counted(hop, column) as up:
        yield up
    up["connections"] = hop.status()["listeners"][column]["connections"] - before


def wan_pull(base: str, image: WanImage, column: str, res: Results, what: str) -> float:
    """One pull of the column's copy of ``image`` from ``base``: its time."""
    copy = image.copies[column]
    r = run_load({"kind": "image", "base": base, "repo": copy.repo, "ref": copy.tag,
                  "concurrency": WAN_CONCURRENCY}, timeout=900)
    if r.get("error") or r.get("error_count"):
        res.note(f"{what}: pull errors: {r.get('error') or r['errors']}")
    elif r["bytes"] != image.size(column):
        res.note(f"{what}: pulled {r['bytes']} bytes of {image.size(column)}")
    seconds: float = r["seconds"]
    return seconds


def wan_direct(hop: WanHop, image: WanImage, res: Results, work: Path) -> None:
    """The reference: the same pull straight from the origin through the hop."""
    size = image.size(DIRECT)
    times, requests, ratios, conns = [], [], [], []
    wait_quiet(res, f"direct WAN pulls {image.key}", max_wait=WAN_QUIET_WAIT)
    for _ in range(1 if size > 256 * MiB else 3):
        with wan_counted(hop, DIRECT) as up:
            times.append(wan_pull(hop.hop_url(DIRECT), image, DIRECT, res, f"direct {image.key}"))
        requests.append(up["count"].requests)
        ratios.append(up["count"].bytes / size)
        conns.append(up["connections"])
    for phase in ("cold", "warm"):
        res.set(f"wan.{image.key}.{phase}.time", ORIGIN, statistics.median(times))
        res.set(f"wan.{image.key}.{phase}.upreq", ORIGIN, max(requests))
        res.set(f"wan.{image.key}.{phase}.upbytes", ORIGIN, max(ratios))
        res.set(f"wan.{image.key}.{phase}.upconn", ORIGIN, max(conns))
    print(f"  {image.label}: {' / '.join(f'{t:.2f}' for t in times)} s, {max(requests)} requests, "
          f"{max(conns)} connections", flush=True)


def wan_system(name: str, base: str, hop: WanHop, image: WanImage, res: Results, work: Path) -> None:
    """A cold pull of the system's own copy, then warm pulls of it."""
    size = image.size(name)
    direct = res.values.get(f"wan.{image.key}.cold.time", {}).get(ORIGIN)
    wait_quiet(res, f"{name} WAN cold pull {image.key}", max_wait=WAN_QUIET_WAIT)
    scratch(work, max(64 * MiB, size + size // 8))
    runs: dict[str, list[tuple[float, int, float, int]]] = {"cold": [], "warm": []}
    for phase in ["cold"] + ["warm"] * WAN_WARM_PULLS:
        with wan_counted(hop, name) as up:
            seconds = wan_pull(base, image, name, res, f"{name} {phase} {image.key}")
        if up.get("busy"):
            res.note(f"{name} {phase} {image.key}: upstream requests still in flight after 120 s")
        runs[phase].append((seconds, up["count"].requests, up["count"].bytes / size, up["connections"]))
    for phase, values in runs.items():
        seconds = statistics.median(v[0] for v in values)
        res.set(f"wan.{image.key}.{phase}.time", name, seconds)
        res.set(f"wan.{image.key}.{phase}.upreq", name, max(v[1] for v in values))
        res.set(f"wan.{image.key}.{phase}.upbytes", name, max(v[2] for v in values))
        res.set(f"wan.{image.key}.{phase}.upconn", name, max(v[3] for v in values))
        if direct:
            res.set(f"wan.{image.key}.{phase}.vs", name, seconds / direct)
    cold, warm = runs["cold"][0], runs["warm"]
    print(f"  {image.label}: cold {cold[0]:.2f} s ({cold[1]} upstream requests, {cold[2]:.2f}x bytes, "
          f"{cold[3]} connections), "
          f"warm {' / '.join(f'{w[0]:.2f}' for w in warm)} s ({max(w[1] for w in warm)} upstream requests)",
          flush=True)


def missing_tools(systems: list[str], scenarios: set[str]) -> list[str]:
    """The programs this run needs that are not installed (said before anything starts,
    rather than as a traceback half-way through)."""
    needed = {REGISTRY_BINARY}
    if "nginx" in systems:
        needed.add(NGINX_BINARY)
    if "manifests" in scenarios:
        needed |= {"wrk", "ab"}
    return sorted(tool for tool in needed if shutil.which(tool) is None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and short windows (smoke run)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of %(default)s")
    parser.add_argument("--out", type=Path, help="also write the table (and notes) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--regproxy-args", default="", metavar="ARGS",
                        help="extra arguments for 'python -m proxy serve', e.g. '--workers 2'")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of %(default)s (on loopback), and/or {WAN} "
                             f"(image pulls through the WAN hop), or 'all'")
    parser.add_argument("--wan-rtt-ms", type=float, default=40.0, help="WAN hop round trip (%(default)s)")
    parser.add_argument("--wan-conn-mibs", type=float, default=25.0,
                        help="WAN hop throughput per connection, MiB/s (%(default)s; 0: no cap)")
    parser.add_argument("--wan-total-mibs", type=float, default=200.0,
                        help="WAN hop throughput in all, MiB/s (%(default)s; 0: no cap)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        parser.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if "all" in scenarios:
        scenarios = (scenarios - {"all"}) | set(ALL_SCENARIOS)
    if not scenarios or scenarios - set(ALL_SCENARIOS):
        parser.error(f"unknown scenario(s) {sorted(scenarios - set(ALL_SCENARIOS))}; choose from "
                     f"{', '.join(ALL_SCENARIOS)}, all")
    wan_shape = {"rtt_ms": args.wan_rtt_ms, "conn_mibs": args.wan_conn_mibs,
                 "total_mibs": args.wan_total_mibs}
    missing = missing_tools(systems, scenarios)
    if missing:
        print(f"bench: missing {', '.join(missing)} (Debian: apt-get install -y docker-registry "
              "nginx wrk apache2-utils)", file=sys.stderr)
        return 2
    sizes = Sizes.quick() if args.quick else Sizes.full()
    bound = (6 if args.quick else 25) * 60 + (5 if args.quick else 10) * 60 * (WAN in scenarios)

    res = Results()
    started = time.monotonic()
    status = 0
    with bounded_run("regproxy-bench-", bound, args.keep) as work:
        try:
            run(systems, sizes, work, res, shlex.split(args.regproxy_args), scenarios, wan_shape,
                args.quick)
        except (KeyboardInterrupt, Deadline) as exc:
            res.note(f"run aborted: {exc!r}")
            status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    mode = "quick" if args.quick else "full"
    if args.regproxy_args:
        mode += f" (regproxy {args.regproxy_args})"
    text = f"{res.table(systems)}\n\n{mode} run, {time.monotonic() - started:.0f} s; "
    if scenarios & set(SCENARIOS):
        text += (f"warm, manifest and cold-pull figures are the median of {sizes.windows} window(s) "
                 f"(cold pulls: one cold copy of the image each; upstream counts: the most of "
                 f"them), the others one run each; ")
    text += "↑/↓: higher/lower is better; ratios are regproxy ÷ other.\n"
    text += "".join(f"\n{line}\n" for line in res.legend)
    if res.notes:
        text += "\nNotes:\n" + "".join(f"- {n}\n" for n in res.notes)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
