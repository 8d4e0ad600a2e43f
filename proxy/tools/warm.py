"""``regproxy warm``: fill the cache ahead of a CI burst by pulling through the running proxy.

Everything goes over HTTP to the proxy, so warming takes the server's own single-flight
path: a blob that a client is already pulling is not fetched twice, and a blob already
cached comes straight off the disk. Bodies are read in 1 MiB chunks, hashed and dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.tools.blobfetch import fetch_blob
from proxy.tools.client import (
    DEFAULT_PROXY,
    Descriptor,
    ImageRef,
    Platform,
    ProxyTLS,
    RegistryClient,
    ResolvedImage,
    ToolError,
    describe,
    resolve,
)
from proxy.tools.progress import make_progress
from proxy.units import human_rate, human_size


@dataclass
class WarmReport:
    images: list[str] = field(default_factory=list)  #: warmed completely
    failed: list[tuple[str, str]] = field(default_factory=list)  #: (image, why)
    blobs: int = 0
    manifests: int = 0
    bytes: int = 0
    #: of ``bytes``, what the proxy already had (its ``X-Cache: hit``)
    cached_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (f"warmed {len(self.images)} image(s), {self.manifests} manifest(s), {self.blobs} blob(s), "
                f"{human_size(self.bytes)} ({human_size(self.cached_bytes)} already cached) in "
                f"{self.seconds:.1f}s ({human_rate(self.bytes, self.seconds)})")
        if self.failed:
            text += f"; {len(self.failed)} image(s) FAILED"
        return text


def read_image_list(path: Path) -> list[str]:
    """One image per line; blank lines and ``#`` comments are skipped."""
    images = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            images.append(text)
    return images


def parse_platforms(platforms: Sequence[str] | None, all_platforms: bool) -> list[Platform] | None:
    """``None`` means every platform; no ``--platform`` means ``linux/amd64``."""
    if all_platforms:
        return None
    return [Platform.parse(p) for p in platforms] if platforms else [Platform("linux", "amd64")]


async def warm(
    images: Sequence[str],
    proxy: str = DEFAULT_PROXY,
    *,
    platforms: Sequence[str] | None = None,
    all_platforms: bool = False,
    jobs: int = 4,
    progress: bool | None = False,
    username: str | None = None,
    password: str | None = None,
    retries: int = 3,
    tls: ProxyTLS | None = None,
) -> WarmReport:
    """Pull ``images`` through the proxy at ``proxy``: manifests (the index and the chosen
    platform children) and every config and layer blob, ``jobs`` blobs at a time."""
    started = time.monotonic()
    report = WarmReport()
    wanted = parse_platforms(platforms, all_platforms)
    jobs = max(1, jobs)
    bar = make_progress(progress)
    refs: list[ImageRef] = []
    for text in images:
        try:
            refs.append(ImageRef.parse(text))
        except ToolError as exc:
            report.failed.append((text, str(exc)))

    async with RegistryClient.connect(proxy, username=username, password=password,
                                      connections=jobs + 4, tls=tls) as client:
        with bar:
            gate = asyncio.Semaphore(jobs)

            async def resolve_one(ref: ImageRef) -> ResolvedImage | None:
                async with gate:
                    try:
                        return await resolve(client, ref, wanted, retries=retries)
                    except Exception as exc:  # reported once, with the others, at the end
                        report.failed.append((str(ref), describe(exc)))
                        return None

            resolved = [r for r in await asyncio.gather(*(resolve_one(r) for r in refs)) if r]
            report.manifests = sum(1 + len(r.images) - (0 if r.top.is_index else 1) for r in resolved)

            # One GET per distinct blob: the cache is content-addressed across repositories.
            owners: dict[str, tuple[ResolvedImage, Descriptor]] = {}
            for image in resolved:
                for desc in image.blobs():
                    owners.setdefault(desc.digest, (image, desc))
            overall = bar.overall(f"{len(resolved)} image(s)", sum(d.size for _, d in owners.values()))
            errors: dict[str, str] = {}

            async def fetch_one(image: ResolvedImage, desc: Descriptor) -> None:
                async with gate:
                    try:
                        size, hit = await fetch_blob(client, image.name, desc, bar, overall,
                                                     retries=retries, image=str(image.ref))
                        report.bytes += size  # not `+= await`: that reads the total first
                        report.cached_bytes += size if hit else 0
                        report.blobs += 1
                    except Exception as exc:  # reported with its images at the end
                        errors[desc.digest] = describe(exc)

            await asyncio.gather(*(fetch_one(i, d) for i, d in owners.values()))

    for image in resolved:
        bad = [errors[d.digest] for d in image.blobs() if d.digest in errors]
        if bad:
            report.failed.append((str(image.ref), f"{len(bad)} blob(s) failed: {bad[0]}"))
        else:
            report.images.append(str(image.ref))
    report.seconds = time.monotonic() - started
    return report
