"""Single flight across replicas: a lease per digest in Redis, and joiners that stream
from the filling replica.

Design (docs/operations.md, "Several replicas"): a replica about to fill a cold blob takes the lease
``regproxy:fill:<digest>`` with ``SET NX PX``; its value is ``<fencing token>|<internal
URL>``, the token a fresh ``INCR`` per attempt. The filler renews the lease every third of
its length and, right before it makes the object visible, checks with a compare-and-extend
that the lease is still its own (the fencing check): a filler that was paused past its lease
does not publish. Content is verified and content-addressed, so even a publish racing that
check writes the same, correct bytes.

A replica that finds the lease taken streams the blob from the holder's internal endpoint
(``GET /_regproxy/fills/<digest>``, authenticated by the cluster secret) while the holder
is still downloading it, so its clients get bytes as they arrive rather than after the
fill. When the holder dies (SIGKILL, network), the stream breaks; the joiner then re-reads
the situation: the object may be stored by now, the lease may have expired (it takes the
fill over and serves its client from the byte it had reached), or another replica may hold
it. Redis unreachable means no cross-replica coordination: each replica fills on its own
(duplicate transfers, never wrong bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

import aiohttp

from proxy.config import ClusterConfig
from proxy.errors import Unavailable
from proxy.pullthrough.coordination import SOLE, Holder, Lease, Reopen
from proxy.reference import Digest

log = logging.getLogger("regproxy.cluster")

FILL_PATH = "/_regproxy/fills/"
SECRET_HEADER = "X-Regproxy-Cluster"
PEER_READ_BUFSIZE = 256 << 10

# Compare-and-extend / compare-and-delete: only the holder of the current value may act.
_RENEW = """if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"""
_RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1]) else return 0 end"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class FillLease:
    """This replica's right to fill one digest, until it stops renewing it."""

    #: (the replica that held it before may have published just before letting go)
    look_again: ClassVar[bool] = True

    cluster: Cluster
    key: str
    value: str
    token: int

    async def renew(self) -> bool:
        """Extend the lease; False if it expired and someone else holds it now."""
        return await self.cluster.eval(_RENEW, self.key, self.value,
                                       str(int(self.cluster.lease * 1000))) == 1

    async def still_held(self) -> bool:
        """The fencing check before publishing. Redis being unreachable counts as held:
        the content is verified and content-addressed, so publishing it is safe, and
        refusing would throw a whole download away."""
        try:
            return await self.renew()
        except Exception as exc:
            log.warning("could not check %s (%s); publishing anyway", self.key,
                        type(exc).__name__)
            return True

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self.cluster.eval(_RELEASE, self.key, self.value)

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[None]:
        """Hold the lease while the block runs (renewed), and let go of it after."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keeper = asyncio.create_task(self.keep(done))
        try:
            yield
        finally:
            done.set_result(None)
            await keeper
            await asyncio.shield(self.release())

    async def keep(self, until: asyncio.Future[None]) -> None:
        """Renew every third of the lease until ``until`` is done."""
        while not until.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cluster.lease / 3):
                    await asyncio.shield(until)
            if until.done():
                return
            try:
                if not await self.renew():
                    log.warning("lost the fill lease %s (token %d)", self.key, self.token)
                    return
            except Exception as exc:  # Redis hiccup: try again at the next tick
                log.warning("could not renew %s: %s", self.key, type(exc).__name__)


class Cluster:
    """This replica's membership: its Redis connection, internal URL and secret. It is the
    :class:`~proxy.pullthrough.coordination.Coordination` and the
    :class:`~proxy.pullthrough.coordination.ClusterEndpoint` of a replica among others."""

    def __init__(self, config: ClusterConfig, redis_url: str,
                 session: aiohttp.ClientSession | None = None) -> None:
        from redis.asyncio import Redis

        self.url = config.advertise_url
        self.lease = config.lease
        self._secret = config.secret
        self._redis = Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.session = session

    async def close(self) -> None:
        await self._redis.aclose()

    async def eval(self, script: str, key: str, *args: str) -> int:
        return int(await self._redis.eval(script, 1, key, *args))

    def authorized(self, header: str | None) -> bool:
        """Whether an internal request carries the cluster secret (constant-time)."""
        return header is not None and hmac.compare_digest(header.encode(), self._secret.encode())

    @property
    def patience(self) -> float:
        """A dead replica's lease blocks the blob until it expires: wait that long, not more."""
        return self.lease + 5.0

    async def claim_fill(self, digest: Digest) -> Lease | Holder:
        """Take the fill lease of ``digest``, or name its holder; the sole lease when Redis
        is unreachable (the caller fills on its own)."""
        key = f"regproxy:fill:{digest}"
        try:
            for _ in range(3):
                token = int(await self._redis.incr(f"regproxy:fence:{digest}"))
                value = f"{token}|{self.url}"
                if await self._redis.set(key, value, nx=True, px=int(self.lease * 1000)):
                    return FillLease(self, key, value, token)
                held = await self._redis.get(key)
                if held is not None:
                    held_token, _, url = _text(held).partition("|")
                    return Holder(url, int(held_token))
        except Exception as exc:
            log.warning("Redis unavailable for the fill lease of %s (%s); filling alone",
                        digest, type(exc).__name__)
        return SOLE

    async def join(self, holder: Holder, digest: Digest, reopen: Reopen) -> RemoteReader | None:
        """Stream ``holder``'s fill of ``digest``; ``None`` if it has none or is unreachable."""
        resp = await self.open_remote(holder, digest)
        return None if resp is None else RemoteReader(self, holder, digest, resp, reopen)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """Run a maintenance job (GC, eviction) on one replica at a time: yields whether
        this replica got the lease ``regproxy:lock:<name>``, renewed while the job runs."""
        key = f"regproxy:lock:{name}"
        token = int(await self._redis.incr(f"regproxy:fence:{name}"))
        lease = FillLease(self, key, f"{token}|{self.url}", token)
        if not await self._redis.set(key, lease.value, nx=True, px=int(self.lease * 1000)):
            yield False
            return
        async with lease.kept():
            yield True

    def maintenance(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """GC and eviction: one pass at a time across the replicas."""
        return self.exclusive("maintenance")

    async def claim_job(self, name: str, seconds: float) -> bool:
        """Take the short lock ``regproxy:lock:<name>`` (it expires by itself): True if this
        replica took it, or Redis is down; False if another replica took it less than
        ``seconds`` ago."""
        try:
            return bool(await self._redis.set(f"regproxy:lock:{name}", self.url, nx=True,
                                              px=int(seconds * 1000)))
        except Exception:
            return True

    async def register_upload(self, uid: str, ttl: float) -> None:
        """Record that this replica holds upload ``uid`` (its bytes are on local disk)."""
        try:
            await self._redis.set(f"regproxy:upload:{uid}", self.url, ex=max(int(ttl), 1))
        except Exception as exc:
            log.warning("could not register upload %s in Redis: %s", uid, type(exc).__name__)

    async def upload_owner(self, uid: str) -> str | None:
        """The replica holding upload ``uid``, if another one does."""
        try:
            owner = await self._redis.get(f"regproxy:upload:{uid}")
        except Exception:
            return None
        url = _text(owner) if owner is not None else None
        return url if url != self.url else None

    async def open_remote(self, holder: Holder, digest: Digest, start: int = 0,
                          end: int | None = None) -> aiohttp.ClientResponse | None:
        """Start streaming ``digest`` from the replica filling it; ``None`` if it has no
        such fill (any more) or cannot be reached."""
        assert self.session is not None, "joining remote fills needs an HTTP session"
        headers = {SECRET_HEADER: self._secret}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = await self.session.get(
                f"{holder.url}{FILL_PATH}{digest}", headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, connect=2.0, sock_read=self.lease),
                # one such stream per joining client: a small read buffer keeps their sum
                # low (the session's 4 MiB suits the single upstream stream of a fill)
                read_bufsize=PEER_READ_BUFSIZE,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("fill holder %s unreachable: %s", holder.url, type(exc).__name__)
            return None
        if resp.status not in (200, 206):
            resp.release()
            return None
        return resp


class RemoteReader:
    """Streams a blob from the replica filling it, and carries on elsewhere when that
    replica goes away (see the module docstring)."""

    def __init__(self, cluster: Cluster, holder: Holder, digest: Digest,
                 resp: aiohttp.ClientResponse, reopen: Reopen) -> None:
        self._cluster = cluster
        self._holder = holder
        self._digest = digest
        self._resp: aiohttp.ClientResponse | None = resp  #: the whole blob, from byte 0
        self.size = resp.content_length
        self._reopen = reopen

    #: (no local file: the bytes come over HTTP)
    local_spans: None = None

    def close(self) -> None:
        if self._resp is not None:
            self._resp.release()
            self._resp = None

    async def stream(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        pos = start
        limit = end if end is not None else self.size
        resp = self._resp
        assert resp is not None, "reader closed"
        if start > 0 or (end is not None and end != self.size):  # a range: ask for just that
            self.close()
            resp = await self._cluster.open_remote(self._holder, self._digest, start, end)
            if resp is None:
                resp = self._resp = None
        try:
            if resp is not None:
                async for chunk in resp.content.iter_any():
                    pos += len(chunk)
                    yield chunk
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("fill holder stream broke at byte %d: %s", pos, type(exc).__name__)
        finally:
            if resp is not None:
                resp.release()
            self.close()
        if limit is not None and pos >= limit:
            return
        if (limit is None and resp is not None and resp.content.at_eof()
                and not resp.content.exception()):
            return  # an unknown-length body that ended cleanly
        # The holder went away mid-blob: carry on from ``pos`` wherever the blob is now.
        deadline = time.monotonic() + self._cluster.lease + 15
        while True:
            try:
                rest = await self._reopen(pos, end)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
        async for chunk in rest:
            yield chunk

