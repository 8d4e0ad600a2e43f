"""``cache.prefetch*`` of ``config.toml``: fetching an image's blobs as soon as its manifest
is fetched, before the client asks for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.settings.fields import choice_value, parse_size, positive_int

#: ``cache.prefetch`` values: ``"layers"`` fills the config and layers of an image manifest
#: fetched by GET; ``"off"`` waits for the client's own blob requests.
PREFETCH_MODES = ("layers", "off")


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """How much of an image the proxy fetches ahead of its client."""

    enabled: bool = True  #: ``cache.prefetch = "layers"``
    concurrency: int = 16  #: ``cache.prefetch_concurrency``: prefetch fills at a time, per process
    #: ``cache.prefetch_max_bytes``: per image, blobs past this many bytes (in manifest
    #: order, the config first) are left to the client's requests; 0: no cap.
    max_bytes: int = 2 << 30


def parse_prefetch(cache: dict[str, Any]) -> PrefetchConfig:
    """The prefetch keys of the (defaults-merged) ``[cache]`` table."""
    mode = choice_value("cache.prefetch", cache["prefetch"], PREFETCH_MODES)
    return PrefetchConfig(
        enabled=mode == "layers",
        concurrency=positive_int("cache.prefetch_concurrency", cache["prefetch_concurrency"]),
        max_bytes=parse_size("cache.prefetch_max_bytes", cache["prefetch_max_bytes"]))
