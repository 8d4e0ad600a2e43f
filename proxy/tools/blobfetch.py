"""One blob pulled through the proxy for the tools (``warm``, ``export``): a progress row,
the body hashed and counted as it streams, the digest and size checked, retried whole.

Both tools must trust what they got to the same standard, so the check lives here once;
they differ only in where the bytes go (dropped, or into a tar member).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

from proxy.tools.client import CHUNK, Descriptor, RegistryClient, ToolError, describe, with_retries
from proxy.tools.progress import Progress, row_label

#: Takes one attempt's body; must read it to the end (or raise).
Sink = Callable[[AsyncIterator[bytes]], Awaitable[None]]


async def _drop(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


async def fetch_blob(client: RegistryClient, name: str, desc: Descriptor, progress: Progress,
                     overall: object, *, retries: int = 3, image: str = "",
                     sink: Sink = _drop,
                     restart: Callable[[], Awaitable[None]] | None = None) -> tuple[int, bool]:
    """GET one blob of repository ``name`` through the proxy; its body goes to ``sink``
    (by default it is dropped), and digest and size are verified. Retried ``retries`` times,
    ``restart`` undoing what a failed attempt left before the next. Returns the bytes read
    by the successful attempt and whether the proxy had the blob already (``X-Cache: hit``).
    Its progress row is labelled with ``image`` (else ``name``)."""
    task = progress.task(row_label(image or name, desc.digest), desc.size)

    async def attempt() -> tuple[int, bool]:
        if restart is not None:
            await restart()
        progress.rewind(task, overall)
        hasher = hashlib.new(desc.algorithm)
        size = 0
        async with client.blob(name, desc.digest) as resp:
            hit = resp.headers.get("X-Cache") == "hit"

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal size
                async for chunk in resp.content.iter_chunked(CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
                    progress.advance(task, len(chunk), overall)
                    yield chunk

            await sink(chunks())
        actual = f"{desc.algorithm}:{hasher.hexdigest()}"
        if size != desc.size or actual != desc.digest:
            raise ToolError(f"blob {desc.digest}: got {size} bytes with digest {actual}, "
                            f"expected {desc.size} bytes", retryable=True)
        return size, hit

    def on_retry(n: int, exc: BaseException) -> None:
        progress.log(f"retry {n}/{retries} of {name}@{desc.digest}: {describe(exc)}")

    try:
        return await with_retries(attempt, retries=retries, on_retry=on_retry)
    finally:
        progress.done(task)
