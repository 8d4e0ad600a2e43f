"""Cold ranges through the proxy: time to the first and the last byte of a 1 MiB range near
the end of a cold blob, asked the moment the blob is first requested, from an upstream
behind the WAN hop (``bench/wanhop.py``).

    python -m bench.cold_ranges [--src DIR] [--unverified] [--size-mib 256] [--runs 3]

``--src`` is the tree whose ``proxy`` package is run (``/work/main`` for "before"; the
default is this checkout); ``--unverified`` sets the upstream's ``unverified_ranges``. Each
run pushes a fresh random blob to a local ``docker-registry`` (so every range is cold),
starts nothing else, and prints one markdown row per run and the medians: time to first
byte (TTFB) and to last byte of the range, when the hop went idle (about the end of the
full fill), and the hop's blob GETs and bytes (single flight: one full fill).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.systems import Regproxy, WanHop
from tests.support.images import push_blob
from tests.support.registry import RegistryProcess

MiB = 1 << 20


class SourceRegproxy(Regproxy):
    """Regproxy run from ``src`` (``-P``: not from the current directory)."""

    def __init__(self, workdir: Path, upstream: str, src: Path, unverified: bool) -> None:
        super().__init__(workdir, upstream)
        self.src, self.unverified = src, unverified

    def command(self) -> list[str]:
        cmd = super().command()
        if self.unverified:
            conf = self.workdir / "config.toml"
            conf.write_text(conf.read_text() + "unverified_ranges = true\n")
        return ["env", f"PYTHONPATH={self.src}", sys.executable, "-P", *cmd[1:]]


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


async def one_run(session: aiohttp.ClientSession, registry: RegistryProcess, hop: WanHop,
                  proxy: str, scratch: Path, size: int, run: int) -> dict[str, float]:
    await asyncio.to_thread(random_file, scratch, size)
    desc = await push_blob(session, registry.url, f"bench/coldrange{run}", scratch)
    await asyncio.to_thread(scratch.unlink)
    mark = hop.mark("proxy")
    start = size - 2 * MiB
    url = f"{proxy}/v2/bench/coldrange{run}/blobs/{desc.digest}"
    t0 = time.monotonic()
    first = last = 0.0
    got = 0
    async with session.get(url, headers={"Range": f"bytes={start}-{start + MiB - 1}"}) as r:
        assert r.status == 206, r.status
        async for chunk in r.content.iter_any():
            if not first:
                first = time.monotonic() - t0
            got += len(chunk)
        last = time.monotonic() - t0
    assert got == MiB, got
    await asyncio.to_thread(hop.wait_idle, 120)
    idle = time.monotonic() - t0
    count = hop.count_since("proxy", mark)
    return {"ttfb": first, "last": last, "idle": idle, "gets": count.blob_gets,
            "mib": count.bytes / MiB}


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-coldrange-") as tmp:
        work = Path(tmp)
        registry = RegistryProcess(work / "origin").start()
        hop = WanHop(work / "hop", registry.port, ["proxy"])
        hop.start(timeout=20)
        proxy = SourceRegproxy(work / "proxy", hop.hop_url("proxy"), args.src, args.unverified)
        try:
            proxy.start()
            timeout = aiohttp.ClientTimeout(total=600)
            rows = []
            async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
                for run in range(args.runs):
                    rows.append(await one_run(session, registry, hop, proxy.url,
                                              work / "blob", args.size_mib * MiB, run))
        finally:
            proxy.stop()
            hop.stop()
            registry.stop()
    mode = "unverified_ranges" if args.unverified else "default"
    print(f"src={args.src} mode={mode} blob={args.size_mib} MiB, hop: {hop.shape}")
    print("| run | TTFB s | last byte s | hop idle s | hop blob GETs | hop MiB |")
    print("|---|---|---|---|---|---|")
    for i, row in enumerate(rows):
        print(f"| {i} | {row['ttfb']:.3f} | {row['last']:.3f} | {row['idle']:.2f} | "
              f"{row['gets']:.0f} | {row['mib']:.1f} |")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"| median | {med['ttfb']:.3f} | {med['last']:.3f} | {med['idle']:.2f} | "
          f"{med['gets']:.0f} | {med['mib']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--unverified", action="store_true")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
