"""Metadata shared between processes and replicas: tag freshness and upstream tokens.

Backed by aiocache: in memory (one process; the default) or Redis (``[cache] backend =
"redis"``), so replicas behind a load balancer share one revalidation per tag TTL and one
token per scope. The cache is an optimisation, never a dependency: when Redis fails, reads
miss and writes are dropped (logged), and the proxy carries on from its store.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

from aiocache import BaseCache, SimpleMemoryCache
from aiocache.serializers import StringSerializer

log = logging.getLogger("regproxy.cache")


class SharedCache:
    """``get``/``set`` of strings with a TTL; errors of the backend degrade to misses."""

    def __init__(self, backend: BaseCache, name: str) -> None:
        self._backend = backend
        self.name = name
        self._last_error = 0.0

    async def get(self, key: str) -> str | None:
        try:
            return await self._backend.get(key)
        except Exception as exc:
            self._report(exc)
            return None

    async def set(self, key: str, value: str, ttl: float) -> None:
        try:
            await self._backend.set(key, value, ttl=ttl)
        except Exception as exc:
            self._report(exc)

    async def delete(self, key: str) -> None:
        try:
            await self._backend.delete(key)
        except Exception as exc:
            self._report(exc)

    async def forget_local(self) -> None:
        """Empty the cache when it is this process's memory (a shared one is left alone:
        whoever changes the store deletes its keys there)."""
        if isinstance(self._backend, SimpleMemoryCache):
            await self._backend.clear()

    @property
    def shared(self) -> bool:
        """Whether other processes see this cache (Redis), not only this one."""
        return not isinstance(self._backend, SimpleMemoryCache)

    async def close(self) -> None:
        try:
            await self._backend.close()
        except Exception as exc:
            self._report(exc)

    def _report(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error > 10:  # one line per 10 s, not one per request
            self._last_error = now
            log.warning("shared cache %s unavailable (%s); carrying on without it",
                        self.name, type(exc).__name__)


def make_cache(backend: str, url: str | None, namespace: str) -> SharedCache:
    """A cache for ``namespace`` on the configured backend."""
    if backend == "redis":
        from aiocache import RedisCache

        parts = urlsplit(url or "redis://127.0.0.1:6379/0")
        kwargs: dict[str, Any] = {
            "endpoint": parts.hostname or "127.0.0.1",
            "port": parts.port or 6379,
            "db": int(parts.path.lstrip("/") or 0),
            "password": parts.password,
        }
        cache: BaseCache = RedisCache(serializer=StringSerializer(), namespace=f"regproxy:{namespace}:",
                                      timeout=1.0, **kwargs)
    else:
        cache = SimpleMemoryCache(serializer=StringSerializer(), namespace=namespace, timeout=None)
    return SharedCache(cache, namespace)
