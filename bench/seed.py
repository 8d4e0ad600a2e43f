"""Random images pushed to the origin through the V2 API (with the test harness' pushers)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.support.images import PushedImage, make_layer_file, push_image

MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """How big the benchmark is."""

    big: int            # the layer pulled cold once, then warm at 1/8/32 clients
    cold: int           # one fresh layer per system for the 16-client burst
    layers: int         # layers of the "many layers" image
    layer_size: int
    tags: int           # small tagged manifests
    duration: float     # seconds of each warm-throughput window
    wrk_duration: float  # seconds of each manifest-load window
    windows: int        # windows per warm/manifest figure (the median is reported)
    scratch: int        # scratch file written and deleted before each cold fill

    @classmethod
    def full(cls) -> Sizes:
        return cls(512 * MiB, 256 * MiB, 50, MiB, 200, 3.0, 5.0, 3, 1024 * MiB)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(64 * MiB, 32 * MiB, 10, MiB, 20, 2.0, 3.0, 1, 256 * MiB)


@dataclass(frozen=True)
class Seeded:
    """What is in the origin."""

    big: PushedImage
    cold: dict[str, PushedImage]      # system -> its own cold image
    many: list[PushedImage]           # one cold many-layer image per cold-pull window
    small_repo: str
    small: list[PushedImage]


async def _seed(base: str, workdir: Path, sizes: Sizes, systems: list[str]) -> Seeded:
    layers_dir = workdir / "layers"
    layers_dir.mkdir(parents=True, exist_ok=True)

    def layer(name: str, size: int, seed: int) -> Path:
        path = layers_dir / name
        make_layer_file(path, size, seed=seed)
        return path

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        big_path = await asyncio.to_thread(layer, "big", sizes.big, 1)
        big = await push_image(session, base, "bench/big", "latest", [big_path])
        os.unlink(big_path)
        cold: dict[str, PushedImage] = {}
        for i, name in enumerate(systems):
            path = await asyncio.to_thread(layer, f"cold-{name}", sizes.cold, 100 + i)
            cold[name] = await push_image(session, base, "bench/cold", name, [path])
            os.unlink(path)
        many = []
        for k in range(sizes.windows):  # distinct layers: each pull of one is cold
            paths = [await asyncio.to_thread(layer, f"l{i}", sizes.layer_size, 1000 * (k + 1) + i)
                     for i in range(sizes.layers)]
            many.append(await push_image(session, base, "bench/layers", f"w{k}", paths))
            for path in paths:
                os.unlink(path)
        small_layer = os.urandom(4096)
        small = []
        for i in range(sizes.tags):
            small.append(await push_image(session, base, "bench/small", f"t{i}", [small_layer],
                                          labels={"bench.index": str(i)}))
    return Seeded(big=big, cold=cold, many=many, small_repo="bench/small", small=small)


def seed(base: str, workdir: Path, sizes: Sizes, systems: list[str]) -> Seeded:
    """Push the benchmark's images to the registry at ``base``."""
    return asyncio.run(_seed(base, workdir, sizes, systems))


# ---------------------------------------------------------------------------------------
# the WAN scenarios' images
# ---------------------------------------------------------------------------------------
KiB = 1 << 10


@dataclass(frozen=True)
class WanImage:
    """One WAN scenario's image: its layers, and one copy with its own random layers per
    column (each system's cold pull is truly cold)."""

    key: str
    label: str
    layer_sizes: tuple[int, ...]
    copies: dict[str, PushedImage]

    def size(self, column: str) -> int:
        """Manifest + config + layers of the column's copy."""
        image = self.copies[column]
        return len(image.manifest) + image.config.size + sum(layer.size for layer in image.layers)


def wan_layer_sizes(quick: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, label, layer sizes) of the three WAN images: (a) many small layers, (b) one big
    layer, (c) a realistic mix (a few tiny metadata layers, a base OS, runtimes, the app)."""
    if quick:
        return [("layers", "(a) 10 x 1 MiB", (MiB,) * 10),
                ("big", "(b) 1 x 64 MiB", (64 * MiB,)),
                ("mix", "(c) mix, 8 layers 2 KiB-16 MiB",
                 (2 * KiB, 48 * KiB, 512 * KiB, MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB))]
    return [("layers", "(a) 50 x 1 MiB", (MiB,) * 50),
            ("big", "(b) 1 x 512 MiB", (512 * MiB,)),
            ("mix", "(c) mix, 8 layers 2 KiB-80 MiB",
             (2 * KiB, 48 * KiB, 512 * KiB, 2 * MiB, 6 * MiB, 14 * MiB, 30 * MiB, 80 * MiB))]


async def _seed_wan(base: str, workdir: Path, quick: bool, columns: list[str]) -> list[WanImage]:
    layers_dir = workdir / "wan-layers"
    layers_dir.mkdir(parents=True, exist_ok=True)
    out = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for k, (key, label, sizes) in enumerate(wan_layer_sizes(quick)):
            copies = {}
            for c, column in enumerate(columns):
                paths = []
                for i, size in enumerate(sizes):
                    path = layers_dir / f"{key}-{column}-{i}"
                    await asyncio.to_thread(make_layer_file, path, size, 10_000 * (k + 1) + 100 * c + i)
                    paths.append(path)
                copies[column] = await push_image(session, base, f"wan/{key}", column, paths)
                for path in paths:
                    os.unlink(path)
            out.append(WanImage(key, label, sizes, copies))
    return out


def seed_wan(base: str, workdir: Path, quick: bool, columns: list[str]) -> list[WanImage]:
    """Push the WAN images (one copy per column: each system and the direct client)."""
    return asyncio.run(_seed_wan(base, workdir, quick, columns))
