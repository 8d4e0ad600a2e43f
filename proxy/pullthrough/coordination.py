"""Who else may be doing the same work at the same time: chosen once, at wiring.

Two answers, one protocol each for the two kinds of user:

* :class:`HostOnly`: this host's worker processes only. They meet through files in the
  store (a fill's locked temp file in ``tmp/``, locks in ``locks/``), which the fill
  machinery uses in every deployment, so there is nothing more to coordinate: every fill
  is this host's alone to run, every job this process's to do.
* :class:`~proxy.pullthrough.cluster.Cluster`: other replicas too, through Redis (a fill
  lease per digest, short job locks, the replica that holds an upload).

The pull-through layer and the evictor take a :class:`Coordination`; the HTTP layer a
:class:`ClusterEndpoint` (the internal fill endpoint, forwarded uploads). Nothing asks
"is there a cluster?".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from proxy.reference import Digest
from proxy.results import BlobReader

if TYPE_CHECKING:
    import aiohttp

T = TypeVar("T")

#: Re-reads the situation for a digest: returns a reader positioned for ``(start, end)``.
Reopen = Callable[[int, int | None], Awaitable[AsyncIterator[bytes]]]


class Lease(Protocol):
    """The right to run one fill, until it is let go of."""

    @property
    def look_again(self) -> bool:
        """Whether whoever held the fill before may have published the blob just before
        this lease was taken (a filler publishes before it lets go), so the store is worth
        one more look before filling."""

    async def still_held(self) -> bool:
        """The fencing check right before publishing."""

    def kept(self) -> AbstractAsyncContextManager[None]:
        """Hold the lease while the block runs, and let go of it after."""

    async def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Holder:
    """Another replica holds the fill of a digest; it serves it at ``url``."""

    url: str
    token: int


class Joined(BlobReader, Protocol):
    """A client's stream of a fill another replica runs."""

    size: int | None


class Coordination(Protocol):
    """What the fills and the background jobs of this process agree on with others."""

    @property
    def patience(self) -> float:
        """How long a client waits for a fill it can neither start nor join (a holder it
        cannot reach) before filling anyway."""

    async def claim_fill(self, digest: Digest) -> Lease | Holder:
        """Take the right to fill ``digest`` (this host already holds the fill's temp
        file), or name who holds it."""

    async def join(self, holder: Holder, digest: Digest, reopen: Reopen) -> Joined | None:
        """Stream ``holder``'s fill of ``digest`` (``reopen`` carries on when it goes
        away); ``None`` when it has no such fill or cannot be reached."""

    async def claim_job(self, job: str, seconds: float) -> bool:
        """Take the short lock on ``job`` (it expires by itself after ``seconds``): True
        when this process should do it, False when another replica took it first."""

    def maintenance(self) -> AbstractAsyncContextManager[bool]:
        """Hold the right to run a maintenance pass (eviction, GC): yields whether this
        process got it; no other process or replica runs one meanwhile."""


class ClusterEndpoint(Protocol):
    """What the HTTP layer asks about other replicas."""

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """For requests to other replicas (forwarded uploads); ``None``: none can be made."""

    def authorized(self, header: str | None) -> bool:
        """Whether an internal request carries the cluster secret."""

    async def register_upload(self, uid: str, ttl: float) -> None:
        """Record that this replica holds upload ``uid``."""

    async def upload_owner(self, uid: str) -> str | None:
        """The URL of the replica holding upload ``uid``, if another one does."""


class SoleLease:
    """A fill nobody else can be running: this host's lock on the fill's temp file is
    all it needs."""

    look_again = False

    async def still_held(self) -> bool:
        return True

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[None]:
        yield

    async def release(self) -> None:
        pass


#: The lease of a fill that needs no other agreement (no other replica, or Redis down).
SOLE = SoleLease()

#: A lock shared by this host's processes, not waited for: yields whether it is held.
HostLock = Callable[[str], AbstractContextManager[bool]]


class HostOnly:
    """No other replica: the worker processes of this host share the store's files, and
    nothing else."""

    patience = 1.0
    session: aiohttp.ClientSession | None = None

    def __init__(self, host_lock: HostLock) -> None:
        self._host_lock = host_lock

    async def claim_fill(self, digest: Digest) -> Lease | Holder:
        return SOLE

    async def join(self, holder: Holder, digest: Digest, reopen: Reopen) -> Joined | None:
        return None  # (no holder is ever named here)

    async def claim_job(self, job: str, seconds: float) -> bool:
        return True

    @contextlib.asynccontextmanager
    async def maintenance(self) -> AsyncIterator[bool]:
        with self._host_lock("evict") as held:
            yield held

    def authorized(self, header: str | None) -> bool:
        return False  # no internal endpoint without a cluster secret

    async def register_upload(self, uid: str, ttl: float) -> None:
        pass

    async def upload_owner(self, uid: str) -> str | None:
        return None


async def from_peer(coordination: Coordination, job: str,
                    probe: Callable[[], Awaitable[T | None]], wait: float = 5.0) -> T | None:
    """When another replica is already asking the upstream for the same thing (``job``),
    wait (up to ``wait``) for its answer through ``probe`` rather than asking too:
    registries such as Docker Hub count manifest requests against pull limits. ``None``:
    ask the upstream here (this process goes first, or the peer took too long)."""
    if await coordination.claim_job(job, wait):
        return None
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        found = await probe()
        if found is not None:
            return found
    return None
