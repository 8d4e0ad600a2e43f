"""Scale-out benchmark (issue 7): replicas on one S3 bucket (SeaweedFS) and one Redis.

    python bench/cluster.py [--keep]

Prints one markdown table (scenario, figure, value, note). Everything runs on 127.0.0.1 in a
temp directory; every process it starts is stopped at the end, on an exception, on
Ctrl-C/SIGTERM and when the run exceeds its time bound (5.5 min). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import os
import platform
import re
import secrets
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bench.run import Deadline, Results, bounded_run, scratch, wait_quiet  # noqa: E402
from bench.systems import _tree_pids  # noqa: E402
from proxy.config import S3Config  # noqa: E402
from tests.support.cluster import Replicas  # noqa: E402
from tests.support.images import (  # noqa: E402
    MANIFEST_ACCEPT,
    PushedImage,
    make_layer_file,
    make_random_bytes,
    push_image,
)
from tests.support.redisproc import RedisProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402
from tests.support.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS, start_seaweedfs  # noqa: E402

MiB = 1 << 20
BIG = 256 * MiB
BURST_CLIENTS = 30
LAYERS = 50
PULL_CLIENTS = 6
PULL_PARALLEL = 3  # blobs at a time per pulling client (docker's max-concurrent-downloads)
WARM_ROUNDS = {1: 3, 8: 1}  # clients -> fetches of the blob per client
TIME_BOUND = 330  # seconds
QUIET_WAIT = 10.0  # at most this long waiting for an idle machine before a scenario


@dataclass
class Report(Results):
    """The table: (scenario, figure, value, note) lines, and notes under it."""

    lines: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, scenario: str, figure: str, value: str, note: str = "") -> None:
        print(f"  {figure}: {value}" + (f"  ({note})" if note else ""), flush=True)
        self.lines.append((scenario, figure, value, note))

    def markdown(self) -> str:
        out = ["| scenario | figure | value | note |", "|---|---|---:|---|"]
        out += [f"| {' | '.join(cell.replace('|', '/') for cell in line)} |" for line in self.lines]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------
# the client side
# ---------------------------------------------------------------------------------------
@dataclass
class Fetch:
    """One blob GET as a client saw it; times are seconds since the scenario's start."""

    url: str
    status: int = 0
    ttfb: float | None = None
    done: float | None = None
    size: int = 0
    redirected: bool = False
    error: str = ""


async def fetch(session: aiohttp.ClientSession, url: str, digest: str, t0: float) -> Fetch:
    """GET ``url`` (following redirects), hash the body, check it is ``digest``."""
    r = Fetch(url)
    h = hashlib.sha256()
    try:
        async with session.get(url) as resp:
            r.status, r.redirected = resp.status, bool(resp.history)
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text(errors='replace'))[:200]}"
                return r
            async for chunk in resp.content.iter_any():
                if r.ttfb is None:
                    r.ttfb = time.monotonic() - t0
                h.update(chunk)
                r.size += len(chunk)
        r.done = time.monotonic() - t0
        if f"sha256:{h.hexdigest()}" != digest:
            r.error = f"digest mismatch ({r.size} bytes)"
    except (aiohttp.ClientError, TimeoutError) as exc:
        r.error = repr(exc)
    return r


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        trust_env=False, read_bufsize=4 * MiB,
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=180, sock_connect=5, sock_read=60))


def blob_url(base: str, repo: str, digest: str) -> str:
    return f"{base}/v2/{repo}/blobs/{digest}"


def failures(fetches: list[Fetch]) -> list[Fetch]:
    return [f for f in fetches if f.error]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms_pair(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.0f} / {percentile(values, 0.9) * 1000:.0f}"


# ---------------------------------------------------------------------------------------
# CPU accounting
# ---------------------------------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of ``pid`` and its descendants so far."""
    if pid is None:
        return 0.0
    ticks = 0
    for p in _tree_pids(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / TICK


class CpuMeter:
    """CPU seconds each named process (tree) and this client process used since creation."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = self._snap()

    def _snap(self) -> dict[str, float]:
        return {**{name: cpu_seconds(pid) for name, pid in self.pids.items()},
                "client": time.process_time()}

    def used(self) -> dict[str, float]:
        end = self._snap()
        return {name: end[name] - self.start[name] for name in end}


def cpu_note(used: dict[str, float]) -> str:
    return ", ".join(f"{name} {sec:.1f}" for name, sec in used.items())


def pid_of(proc: Any) -> int | None:
    """Pid of a running helper (``ProxyProcess.proc``, ``SeaweedFS.proc``, ``RegistryProcess._proc``)."""
    popen = getattr(proc, "proc", None) or getattr(proc, "_proc", None)
    return popen.pid if popen is not None and popen.poll() is None else None


# ---------------------------------------------------------------------------------------
# the origin's access log
# ---------------------------------------------------------------------------------------
_ACCESS = re.compile(r'"GET (/v2/\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def upstream_gets(origin: RegistryProcess, fragment: str) -> tuple[int, int]:
    """(GET requests, body bytes) the origin logged for paths containing ``fragment``."""
    count = size = 0
    for line in origin.log_path.read_text(errors="replace").splitlines():
        m = _ACCESS.search(line)
        if m and fragment in m.group(1):
            count += 1
            size += int(m.group(3)) if m.group(3) != "-" else 0
    return count, size


async def origin_settled(origin: RegistryProcess, quiet: float = 1.5, limit: float = 30.0) -> None:
    """Wait until the origin's log has not grown for ``quiet`` seconds (background fills
    log their GET when they end)."""
    deadline = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = origin.log_path.stat().st_size
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------
async def cold_burst(rep: Report, group: Replicas, redis_url: str, origin: RegistryProcess,
                     seaweed: SeaweedFS, image: PushedImage) -> None:
    s = f"1. {BURST_CLIENTS} cold clients, 3 replicas (S3 + Redis), {BIG // MiB} MiB blob"
    digest = image.layers[0].digest
    urls = [p.url for p in group.procs]
    holder: str | None = None
    r = aioredis.Redis.from_url(redis_url)
    meter = CpuMeter({**{f"replica{i}": pid_of(p) for i, p in enumerate(group.procs)},
                      "weed": pid_of(seaweed), "origin": pid_of(origin)})
    try:
        async with new_session() as session:
            t0 = time.monotonic()
            tasks = [asyncio.create_task(fetch(session, blob_url(urls[i % 3], image.repo, digest),
                                               digest, t0))
                     for i in range(BURST_CLIENTS)]
            while holder is None and not all(t.done() for t in tasks):
                value = await r.get(f"regproxy:fill:{digest}")
                if value is not None:
                    holder = value.decode().partition("|")[2]
                else:
                    await asyncio.sleep(0.005)
            results = await asyncio.gather(*tasks)
        used = meter.used()
    finally:
        await r.aclose()
    await origin_settled(origin)
    gets, size = upstream_gets(origin, f"/blobs/{digest}")
    rep.add(s, "upstream GETs of the blob", str(gets), "origin access log; 1 = single flight across replicas")
    rep.add(s, "upstream bytes ÷ blob size", f"{size / BIG:.2f}")
    name = {u: f"replica{i}" for i, u in enumerate(urls)}
    rep.add(s, "filling replica", name.get(holder, str(holder)) if holder else "unknown",
            "value of `regproxy:fill:<digest>` in Redis while the fill ran" if holder else
            "the Redis fill key was never seen (polled every 5 ms)")
    on = [f.ttfb for f in results if f.ttfb is not None and f.url.startswith(f"{holder}/")]
    off = [f.ttfb for f in results if f.ttfb is not None and not f.url.startswith(f"{holder}/")]
    rep.add(s, "TTFB on the filling replica, median / p90, ms", ms_pair(on),
            f"{len(on)} clients; from the release of all {BURST_CLIENTS}")
    rep.add(s, "TTFB on the non-filling replicas, median / p90, ms", ms_pair(off),
            f"{len(off)} clients; they stream from the filler (`/_regproxy/fills/`)")
    done = [f.done for f in results if f.done is not None]
    rep.add(s, f"all {BURST_CLIENTS} done, s", f"{max(done):.2f}" if done else "-",
            f"first done {min(done):.2f} s" if done else "")
    rep.add(s, "CPU seconds used until all were done, all processes", f"{sum(used.values()):.1f}",
            cpu_note(used) + f"; {os.cpu_count()} cores")
    bad = failures(results)
    rep.add(s, "failed clients (status, length or sha256)", str(len(bad)),
            "; ".join(f"{f.url}: {f.error}" for f in bad[:2]))


async def pull_image(session: aiohttp.ClientSession, base: str, image: PushedImage, t0: float
                     ) -> list[Fetch]:
    """A docker-like pull: manifest by tag, then config + layers, PULL_PARALLEL at a time."""
    url = f"{base}/v2/{image.repo}/manifests/{image.tag}"
    man = Fetch(url)
    try:
        async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
            man.status = resp.status
            body = await resp.read()
        man.done, man.size = time.monotonic() - t0, len(body)
        if f"sha256:{hashlib.sha256(body).hexdigest()}" != image.digest:
            man.error = f"manifest: HTTP {man.status}, digest mismatch"
    except (aiohttp.ClientError, TimeoutError) as exc:
        man.error = repr(exc)
    if man.error:
        return [man]
    gate = asyncio.Semaphore(PULL_PARALLEL)

    async def one(digest: str) -> Fetch:
        async with gate:
            return await fetch(session, blob_url(base, image.repo, digest), digest, t0)

    blobs = [image.config.digest, *(layer.digest for layer in image.layers)]
    return [man, *await asyncio.gather(*(one(d) for d in blobs))]


async def cold_pull(rep: Report, group: Replicas, origin: RegistryProcess, image: PushedImage) -> None:
    s = f"2. {LAYERS} x 1 MiB image, {PULL_CLIENTS} cold pulls over 3 replicas"
    async with new_session() as session:
        t0 = time.monotonic()
        pulls = await asyncio.gather(*(pull_image(session, group.procs[i % 3].url, image, t0)
                                       for i in range(PULL_CLIENTS)))
    total = max(max((f.done or 0.0) for f in pull) for pull in pulls)
    await origin_settled(origin)
    counts = [upstream_gets(origin, f"/blobs/{d}")[0]
              for d in [image.config.digest, *(layer.digest for layer in image.layers)]]
    rep.add(s, "upstream GETs per blob, max", str(max(counts)),
            f"min {min(counts)}, {sum(counts)} for {len(counts)} blobs (config + layers); "
            f"manifest by tag: {upstream_gets(origin, f'/manifests/{image.tag}')[0]} GET(s)")
    rep.add(s, f"all {PULL_CLIENTS} pulls done, s", f"{total:.2f}",
            f"each pull: manifest, then config + layers {PULL_PARALLEL} at a time")
    bad = [f for pull in pulls for f in failures(pull)]
    rep.add(s, "failed requests", str(len(bad)), "; ".join(f"{f.url}: {f.error}" for f in bad[:2]))


async def warm_up(base: str, repo: str, digest: str, origin: RegistryProcess, expect_redirect: bool
                  ) -> str | None:
    """First GET of the blob (it fills if cold); with ``expect_redirect`` wait until the node
    answers with a redirect (the S3 commit follows the client's last byte). Error or None."""
    async with new_session() as session:
        first = await fetch(session, blob_url(base, repo, digest), digest, time.monotonic())
        if first.error:
            return f"warm-up GET failed: {first.error}"
        await origin_settled(origin)
        deadline = time.monotonic() + 20
        while expect_redirect:
            async with session.get(blob_url(base, repo, digest), allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308):
                    break
            if time.monotonic() > deadline:
                return f"no redirect yet (HTTP {resp.status})"
            await asyncio.sleep(0.2)
    return None


async def throughput(url: str, digest: str, clients: int, rounds: int) -> tuple[float, list[Fetch]]:
    """Aggregate MiB/s of ``clients`` clients each fetching the blob ``rounds`` times."""
    async with new_session() as session:
        t0 = time.monotonic()

        async def client() -> list[Fetch]:
            return [await fetch(session, url, digest, t0) for _ in range(rounds)]

        fetched = [f for run in await asyncio.gather(*(client() for _ in range(clients))) for f in run]
        elapsed = time.monotonic() - t0
    return sum(f.size for f in fetched if not f.error) / MiB / elapsed, fetched


async def warm(rep: Report, label: str, note: str, node: Any, seaweed: SeaweedFS | None,
               origin: RegistryProcess, image: PushedImage, expect_redirect: bool = False) -> None:
    base = node.url
    s = f"3. warm {BIG // MiB} MiB blob: {label}"
    digest = image.layers[0].digest
    problem = await warm_up(base, image.repo, digest, origin, expect_redirect)
    if problem:
        rep.note(f"{label}: {problem}")
    os.sync()
    await asyncio.to_thread(wait_quiet, rep, f"warm {label}", QUIET_WAIT)
    before = upstream_gets(origin, f"/blobs/{digest}")[0]
    for clients, rounds in WARM_ROUNDS.items():
        meter = CpuMeter({"node": pid_of(node), "weed": pid_of(seaweed) if seaweed else None})
        mibs, fetched = await throughput(blob_url(base, image.repo, digest), digest, clients, rounds)
        used = meter.used()
        if seaweed is None:
            del used["weed"]
        bad = failures(fetched)
        redirected = sum(f.redirected for f in fetched)
        extra = f"{clients * rounds} GETs, {redirected} followed a redirect" if expect_redirect else \
            f"{clients * rounds} GETs"
        gib = clients * rounds * BIG / (1 << 30)
        extra += "; CPU s per GiB: " + cpu_note({k: v / gib for k, v in used.items()})
        if bad:
            extra += f"; {len(bad)} FAILED, e.g. {bad[0].error}"
        rep.add(s, f"{clients} client{'s' if clients > 1 else ''}, MiB/s aggregate", f"{mibs:.0f}",
                f"{note}; {extra}")
    await origin_settled(origin)
    after = upstream_gets(origin, f"/blobs/{digest}")[0]
    rep.add(s, "upstream GETs during the warm runs", str(after - before))


# ---------------------------------------------------------------------------------------
# set-up and main
# ---------------------------------------------------------------------------------------
async def seed(origin: RegistryProcess, work: Path) -> tuple[PushedImage, PushedImage]:
    """The 256 MiB single-layer image and the 50 x 1 MiB-layer image."""
    path = work / "big-layer"
    await asyncio.to_thread(make_layer_file, path, BIG, secrets.randbits(32))
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=600)) as session:
        big = await push_image(session, origin.url, "bench/big", "latest", [path])
        path.unlink()
        layers = [make_random_bytes(MiB, secrets.randbits(32)) for _ in range(LAYERS)]
        many = await push_image(session, origin.url, "bench/layers", "latest", layers)
    return big, many


def s3_config(seaweed: SeaweedFS, redirect: bool = False) -> S3Config:
    return S3Config(bucket=BUCKET, endpoint_url=seaweed.endpoint, access_key=ACCESS_KEY,
                    secret_key=SECRET_KEY, prefix=f"bench-{secrets.token_hex(4)}/", redirect=redirect)


def log_problems(path: Path) -> list[str]:
    """Warning/error lines of a replica's log."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines()
            if any(w in line for w in ("WARNING", "ERROR", "CRITICAL", "Traceback", "Exception"))]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """No Ctrl-C, SIGTERM or deadline while the processes are being stopped."""
    signal.alarm(0)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run(rep: Report, work: Path) -> None:
    stack = contextlib.ExitStack()
    groups: list[tuple[str, Replicas]] = []

    def start(name: str, group: Replicas) -> Replicas:
        groups.append((name, group))
        stack.callback(group.stop)
        return group.start()

    def step(what: str, fn: Callable[[], Any]) -> None:
        print(f"== {what}", flush=True)
        try:
            fn()
        except Deadline:
            raise
        except Exception as exc:  # one scenario failing does not stop the others
            rep.note(f"{what}: failed: {exc!r}\n{traceback.format_exc(limit=4)}")

    try:
        origin = RegistryProcess(work / "origin")
        stack.callback(origin.stop)
        origin.start()
        redis_proc = RedisProcess(work / "redis")
        stack.callback(redis_proc.stop)
        redis_proc.start()
        seaweed = start_seaweedfs(work / "seaweedfs")
        stack.callback(seaweed.stop)
        t = time.monotonic()
        big, many = asyncio.run(seed(origin, work))
        print(f"seeded the origin in {time.monotonic() - t:.1f}s", flush=True)

        cluster = start("cluster", Replicas(work / "cluster", origin.url, s3_config(seaweed),
                                            redis_proc.url, n=3))

        def burst() -> None:
            wait_quiet(rep, "the cold burst", QUIET_WAIT)
            scratch(work, 1024 * MiB)
            asyncio.run(cold_burst(rep, cluster, redis_proc.url, origin, seaweed, big))

        def pull() -> None:
            wait_quiet(rep, "the cold pulls", QUIET_WAIT)
            scratch(work, 256 * MiB)
            asyncio.run(cold_pull(rep, cluster, origin, many))

        step("cold burst", burst)
        step("cold pulls", pull)
        step("warm, S3 replica", lambda: asyncio.run(warm(
            rep, "S3 backend, replica0", "streams from S3", cluster.procs[0], seaweed, origin, big)))
        fs = start("fs", Replicas(work / "fs", origin.url, None, None, n=1))
        step("warm, filesystem node", lambda: asyncio.run(warm(
            rep, "filesystem node", "sendfile from local disk", fs.procs[0], None, origin, big)))
        redirect = start("redirect", Replicas(work / "redirect", origin.url,
                                              s3_config(seaweed, redirect=True), None, n=1))
        step("warm, S3 redirect", lambda: asyncio.run(warm(
            rep, "S3 backend, redirect = true", "307 to a presigned SeaweedFS URL, client follows",
            redirect.procs[0], seaweed, origin, big, expect_redirect=True)))
    finally:
        for name, group in groups:
            for i, proc in enumerate(group.procs):
                if proc.proc is not None and proc.proc.poll() is not None:
                    rep.note(f"{name}/replica{i} exited with {proc.proc.returncode}")
                problems = log_problems(proc.log_path)
                if problems:
                    rep.note(f"{name}/replica{i}: {len(problems)} warning/error log lines, e.g.: "
                             + " || ".join(p[:300] for p in problems[:3]))
        with signals_held():
            stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    rep = Report()
    started = time.monotonic()
    status = 0
    with bounded_run("regproxy-cluster-", TIME_BOUND, args.keep) as work:
        try:
            run(rep, work)
        except (KeyboardInterrupt, Deadline) as exc:
            rep.note(f"run aborted: {exc!r}")
            status = 130 if isinstance(exc, KeyboardInterrupt) else 1
        except Exception as exc:
            rep.note(f"run failed: {exc!r}\n{traceback.format_exc(limit=6)}")
            status = 1
    print(f"\n{rep.markdown()}\n")
    print(f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {os.cpu_count()} cores "
          f"({platform.machine()}); run took {time.monotonic() - started:.0f} s; every client verifies "
          "the sha256 of every body, in the same process (shares the cores with the servers).")
    if rep.notes:
        print("\nNotes:\n" + "".join(f"- {n}\n" for n in rep.notes))
    return status


if __name__ == "__main__":
    sys.exit(main())
