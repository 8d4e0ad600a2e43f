"""A WAN hop for the benchmark: an asyncio TCP relay that makes a loopback upstream look
like a registry across the internet (a CI runner pulling from Docker Hub, by default).

    python -m bench.wanhop --control 127.0.0.1:PORT --log-dir DIR \
        [--rtt-ms 40] [--conn-mibs 25] [--total-mibs 200] \
        --listen NAME=PORT:UPSTREAM_HOST:UPSTREAM_PORT [--listen ...]

There is no netem on the bench machine, so the link is modelled in userspace, per
direction of each relayed connection:

* **propagation**: every chunk read is delivered RTT/2 after it may leave (a delay line),
  so each request/response exchange costs one RTT, and a stream pays it once;
* **connection set-up**: nothing a client sends on a new connection leaves before one RTT
  after the connection was accepted (the TCP handshake);
* **per-connection throughput**: a token bucket at ``conn`` bytes/s (TCP's window over the
  RTT: 25 MiB/s is a 1 MiB window at 40 ms);
* **aggregate throughput**: one token bucket at ``total`` bytes/s shared by every
  connection of every listener (the runner's link).

Reads are as large as asyncio makes them (256 KiB) and no byte is looked at except in
HTTP heads: bodies are skipped by arithmetic, so the relay costs little CPU.

It also counts what crosses it, like the nginx counting hop: one line per response in
``DIR/hop-NAME.log`` (``METHOD path status body_bytes``), and ``GET /status`` on the
control port answers JSON with the requests in flight (``active``) and the relay's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MiB = 1 << 20
# The pipe stops reading its source while what it read is due to leave more than this far
# ahead (the rest waits in the kernel's socket buffers, as on a real link).
READ_AHEAD = 0.005
# Bytes a pipe may hold (scheduled, not yet written) before it stops reading its source.
QUEUE_LIMIT = 8 * MiB
HEAD_LIMIT = 64 * 1024  # longest HTTP head (or chunk-size line) looked for
WRITE_HIGH = MiB  # transport write-buffer limits of each relayed socket


# ---------------------------------------------------------------------------------------
# shaping: token buckets (the arithmetic is a pure function, unit-tested)
# ---------------------------------------------------------------------------------------
def bucket_take(level: float, stamp: float, now: float, n: int, rate: float,
                burst: float) -> tuple[float, float, float]:
    """Take ``n`` bytes' tokens from a bucket that held ``level`` at ``stamp``; return
    (level, stamp, departure). The bucket refills at ``rate`` up to ``burst``; it may go
    negative (a debt), and the bytes have left once the debt is paid back, so a sender
    that takes more than there is waits ``debt / rate``, and later senders queue behind
    it (FIFO, one debt per bucket, no timer)."""
    if now > stamp:
        level = min(burst, level + (now - stamp) * rate)
        stamp = now
    level -= n
    return level, stamp, stamp + max(0.0, -level) / rate


class Bucket:
    """A token bucket (bytes/s) with its state."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = 0.0

    def take(self, now: float, n: int) -> float:
        """Reserve ``n`` bytes at ``now``; return when they have left."""
        self.level, self.stamp, departs = bucket_take(self.level, self.stamp, now, n, self.rate,
                                                      self.burst)
        return departs


@dataclass(frozen=True)
class Shape:
    """The modelled link."""

    rtt: float = 0.040               # seconds
    conn_rate: float = 25 * MiB      # bytes/s per connection and direction (0: no cap)
    total_rate: float = 200 * MiB    # bytes/s over all connections, per direction (0: no cap)
    conn_burst: float = 64 * 1024    # what may leave at once after idling
    total_burst: float = 256 * 1024


def departure(now: float, n: int, not_before: float, buckets: list[Bucket]) -> float:
    """When ``n`` bytes read at ``now`` may leave: after ``not_before`` and once every
    bucket (connection, aggregate) has let them through."""
    departs = max(now, not_before)
    for bucket in buckets:
        departs = max(departs, bucket.take(now, n))
    return departs


# ---------------------------------------------------------------------------------------
# HTTP/1.1 framing, to count requests and body bytes without copying bodies
# ---------------------------------------------------------------------------------------
NO_BODY = -1
CHUNKED = -2
UNTIL_CLOSE = -3
OPAQUE = -4  # unparseable framing: stop counting this direction

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_END, _TRAILER, _CLOSE, _OPAQUE = range(7)


class MessageStream:
    """Finds message boundaries in one direction of an HTTP/1.1 connection.

    Heads (and chunk-size lines) are buffered and parsed; bodies are skipped by counting.
    ``on_head(start_line, headers)`` returns the body's framing: a length, ``NO_BODY``,
    ``CHUNKED`` or ``UNTIL_CLOSE``; ``on_done(body_bytes)`` is called at each message's end.
    Anything it cannot parse turns it off (``opaque``): bytes still flow, uncounted.
    """

    def __init__(self, on_head: Callable[[str, dict[str, str]], int],
                 on_done: Callable[[int], None]) -> None:
        self.on_head = on_head
        self.on_done = on_done
        self.state = _HEAD
        self.buf = bytearray()
        self.remaining = 0
        self.chunked = False
        self.body = 0  # body bytes of the current message

    @property
    def opaque(self) -> bool:
        return self.state == _OPAQUE

    @property
    def in_message(self) -> bool:
        """A message has started and not ended."""
        return self.state not in (_HEAD, _OPAQUE) or bool(self.buf)

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and self.state != _OPAQUE:
            if self.state == _BODY:
                take = min(self.remaining, end - pos)
                pos += take
                self.remaining -= take
                self.body += take
                if self.remaining == 0:
                    if self.chunked:
                        self.state = _CHUNK_END
                    else:
                        self._done()
            elif self.state == _CLOSE:
                self.body += end - pos
                pos = end
            else:
                term = b"\r\n\r\n" if self.state == _HEAD else b"\r\n"
                found, pos = self._until(data, pos, term)
                if found is not None:
                    self._line(found)

    def feed_eof(self) -> None:
        """The connection ended: a body delimited by the close is complete."""
        if self.state == _CLOSE:
            self._done()

    def _until(self, data: bytes, pos: int, term: bytes) -> tuple[bytes | None, int]:
        """The bytes up to ``term`` (buffered across reads), and the position after it."""
        end = len(data)
        if not self.buf:
            limit = min(end, pos + HEAD_LIMIT)
            i = data.find(term, pos, limit)
            if i >= 0:
                return data[pos:i], i + len(term)
            if limit < end:
                self.state = _OPAQUE
            else:
                self.buf += data[pos:end]
            return None, end
        old = len(self.buf)
        piece = data[pos:pos + HEAD_LIMIT]
        self.buf += piece
        i = self.buf.find(term, max(0, old - len(term) + 1))
        if i >= 0:
            line = bytes(self.buf[:i])
            self.buf.clear()
            return line, pos + i + len(term) - old
        if len(self.buf) > HEAD_LIMIT:
            self.state = _OPAQUE
        return None, pos + len(piece)

    def _line(self, line: bytes) -> None:
        if self.state == _HEAD:
            if not line:  # stray CRLF between messages
                return
            text = line.decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for raw in text[1:]:
                name, _, value = raw.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.body = 0
            framing = self.on_head(text[0], headers)
            if framing == NO_BODY or framing == 0:
                self._done()
            elif framing == CHUNKED:
                self.chunked = True
                self.state = _CHUNK_SIZE
            elif framing == UNTIL_CLOSE:
                self.state = _CLOSE
            elif framing > 0:
                self.chunked = False
                self.remaining = framing
                self.state = _BODY
            else:
                self.state = _OPAQUE
        elif self.state == _CHUNK_SIZE:
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.state = _OPAQUE
                return
            if size == 0:
                self.state = _TRAILER
            else:
                self.remaining = size
                self.state = _BODY
        elif self.state == _CHUNK_END:
            self.state = _CHUNK_SIZE if not line else _OPAQUE
        elif self.state == _TRAILER and not line:
            self._done()

    def _done(self) -> None:
        self.state = _HEAD
        self.chunked = False
        self.on_done(self.body)


def body_framing(headers: dict[str, str]) -> int:
    """A message's body framing from its headers (requests, and responses that may have one)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return CHUNKED
    length = headers.get("content-length")
    if length is None:
        return UNTIL_CLOSE
    try:
        return int(length)
    except ValueError:
        return OPAQUE


# ---------------------------------------------------------------------------------------
# the relay
# ---------------------------------------------------------------------------------------
class Listener:
    """One listening port (one system, or the direct client) and its counters."""

    def __init__(self, hop: Hop, name: str, port: int, upstream: tuple[str, int]) -> None:
        self.hop = hop
        self.name = name
        self.port = port
        self.upstream = upstream
        self.log: IO[str] = open(hop.log_dir / f"hop-{name}.log", "a", buffering=1)  # noqa: SIM115
        self.requests = 0
        self.bytes = 0
        self.connections = 0

    def record(self, method: str, path: str, status: int, body: int) -> None:
        self.requests += 1
        self.bytes += body
        self.log.write(f"{method} {path} {status} {body}\n")


class Hop:
    """The relay process: listeners, the shared aggregate buckets, the counters."""

    def __init__(self, shape: Shape, log_dir: Path) -> None:
        self.shape = shape
        self.log_dir = log_dir
        self.listeners: dict[str, Listener] = {}
        self.total_up = Bucket(shape.total_rate, shape.total_burst) if shape.total_rate else None
        self.total_down = Bucket(shape.total_rate, shape.total_burst) if shape.total_rate else None
        self.active = 0  # requests seen whose response has not ended
        self.links: set[Link] = set()

    def status(self) -> dict[str, object]:
        times = os.times()
        return {
            "active": self.active,
            "links": len(self.links),
            "cpu_s": times.user + times.system,
            "listeners": {name: {"requests": lst.requests, "bytes": lst.bytes,
                                 "connections": lst.connections}
                          for name, lst in self.listeners.items()},
        }


class Side(asyncio.Protocol):
    """One socket of a relayed connection: what it reads goes into ``out``, and ``into``
    writes to it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.out: Pipe | None = None
        self.into: Pipe | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        if self.out is not None:
            self.out.feed(data)

    def eof_received(self) -> bool:
        if self.out is not None:
            self.out.feed_eof()
        return True  # keep writing what is still due to this side

    def connection_lost(self, exc: Exception | None) -> None:
        if self.out is not None:
            self.out.feed_eof()

    def pause_writing(self) -> None:
        if self.into is not None:
            self.into.pause_source("dst")

    def resume_writing(self) -> None:
        if self.into is not None:
            self.into.resume_source("dst")


class ClientSide(Side):
    """An accepted socket: it makes its link, which connects to the upstream."""

    def __init__(self, listener: Listener) -> None:
        super().__init__()
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        link = Link(self.listener, self)
        asyncio.get_running_loop().create_task(link.connect())


class Pipe:
    """One direction of a relayed connection: shaping, delay line and framing."""

    def __init__(self, link: Link, src: Side, dst: Side, buckets: list[Bucket], not_before: float,
                 stream: MessageStream) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.src = src
        self.dst = dst
        self.buckets = buckets
        self.delay = link.hop.shape.rtt / 2
        self.not_before = not_before
        self.stream = stream
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued = 0
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused: set[str] = set()
        self.ended = False

    def feed(self, data: bytes) -> None:
        now = self.loop.time()
        self.stream.feed(data)
        departs = departure(now, len(data), self.not_before, self.buckets)
        self._enqueue(departs + self.delay, data)
        if departs - now > READ_AHEAD:
            self.pause_source("rate")
            self.loop.call_at(departs - READ_AHEAD, self.resume_source, "rate")
        if self.queued > QUEUE_LIMIT:
            self.pause_source("queue")

    def feed_eof(self) -> None:
        """The source ended: the link closes once everything read before was delivered."""
        if self.ended or self.link.closed:
            return
        self.ended = True
        self.stream.feed_eof()
        self._enqueue(max(self.loop.time(), self.not_before) + self.delay, None)

    def _enqueue(self, due: float, data: bytes | None) -> None:
        due = max(due, self.last_due)  # in order
        self.last_due = due
        self.queue.append((due, data))
        if data is not None:
            self.queued += len(data)
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Write what is due; called by the timer, and once the upstream is connected."""
        self.timer = None
        transport = self.dst.transport
        if transport is None:  # not connected yet: connect() calls flush
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is None:
                self.link.close()
                return
            self.queued -= len(data)
            if not transport.is_closing():
                transport.write(data)
        if "queue" in self.paused and self.queued < QUEUE_LIMIT // 2:
            self.resume_source("queue")
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def pause_source(self, why: str) -> None:
        transport = self.src.transport
        if not self.paused and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self.paused.add(why)

    def resume_source(self, why: str) -> None:
        if why not in self.paused:
            return
        self.paused.discard(why)
        transport = self.src.transport
        if not self.paused and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class Link:
    """One client connection relayed to its upstream: two sides, two pipes, and the
    requests waiting for their responses (FIFO)."""

    def __init__(self, listener: Listener, client: Side) -> None:
        self.listener = listener
        self.hop = listener.hop
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.upstream = Side()
        self.pending: deque[tuple[str, str]] = deque()
        self.status = 0
        self.interim = False
        self.closed = False
        shape = self.hop.shape

        def buckets(total: Bucket | None) -> list[Bucket]:
            own = [Bucket(shape.conn_rate, shape.conn_burst)] if shape.conn_rate else []
            return own + ([total] if total is not None else [])

        self.requests = MessageStream(self._request_head, lambda body: None)
        self.responses = MessageStream(self._response_head, self._response_done)
        # a new connection carries nothing before the handshake's round trip
        self.up = Pipe(self, client, self.upstream, buckets(self.hop.total_up),
                       self.loop.time() + shape.rtt, self.requests)
        self.down = Pipe(self, self.upstream, client, buckets(self.hop.total_down), 0.0, self.responses)
        client.out, client.into = self.up, self.down
        self.upstream.out, self.upstream.into = self.down, self.up
        self.hop.links.add(self)
        listener.connections += 1

    async def connect(self) -> None:
        host, port = self.listener.upstream
        try:
            await self.loop.create_connection(lambda: self.upstream, host, port)
        except OSError:
            self.close()
            return
        if self.closed:  # the client went away meanwhile
            if self.upstream.transport is not None:
                self.upstream.transport.close()
            return
        self.up.flush()

    def _request_head(self, line: str, headers: dict[str, str]) -> int:
        method, _, rest = line.partition(" ")
        self.pending.append((method, rest.rpartition(" ")[0] or rest))
        self.hop.active += 1
        framing = body_framing(headers)
        return NO_BODY if framing == UNTIL_CLOSE else framing

    def _response_head(self, line: str, headers: dict[str, str]) -> int:
        parts = line.split(" ", 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            return OPAQUE
        self.interim = 100 <= self.status < 200
        method = self.pending[0][0] if self.pending else "GET"
        if self.interim or method == "HEAD" or self.status in (204, 304):
            return NO_BODY
        return body_framing(headers)

    def _response_done(self, body: int) -> None:
        if self.interim:
            return
        if not self.pending:  # a response to no request: count it, nothing was in flight
            self.listener.record("?", "?", self.status, body)
            return
        method, path = self.pending.popleft()
        self.hop.active -= 1
        self.listener.record(method, path, self.status, body)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pipe in (self.up, self.down):
            pipe.cancel()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()
        partial = self.responses.body if self.responses.in_message else 0
        while self.pending:  # requests that got no (complete) response: status 0
            method, path = self.pending.popleft()
            self.hop.active -= 1
            self.listener.record(method, path, 0, partial)
            partial = 0
        self.hop.links.discard(self)


async def _control(hop: Hop, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``GET /status``: JSON counters; anything else: 200 ``{}`` (the readiness probe)."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
        body = json.dumps(hop.status() if path == b"/status" else {}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
    writer.close()


async def serve(shape: Shape, log_dir: Path, control: tuple[str, int],
                listens: list[tuple[str, int, tuple[str, int]]]) -> None:
    hop = Hop(shape, log_dir)
    loop = asyncio.get_running_loop()
    servers = []
    for name, port, upstream in listens:
        listener = Listener(hop, name, port, upstream)
        hop.listeners[name] = listener
        servers.append(await loop.create_server(functools.partial(ClientSide, listener), "127.0.0.1",
                                                port, backlog=1024))
    servers.append(await asyncio.start_server(lambda r, w: _control(hop, r, w), *control))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    for link in list(hop.links):
        link.close()
    for listener in hop.listeners.values():
        listener.log.close()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True, type=_hostport, help="HOST:PORT of /status")
    parser.add_argument("--log-dir", required=True, type=Path)
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--conn-mibs", type=float, default=25.0, help="MiB/s per connection (0: no cap)")
    parser.add_argument("--total-mibs", type=float, default=200.0, help="MiB/s in all (0: no cap)")
    parser.add_argument("--listen", action="append", default=[], metavar="NAME=PORT:HOST:PORT",
                        help="a listening port and the upstream it relays to")
    args = parser.parse_args(argv)
    listens = []
    for spec in args.listen:
        name, _, rest = spec.partition("=")
        port, _, upstream = rest.partition(":")
        listens.append((name, int(port), _hostport(upstream)))
    if not listens:
        parser.error("at least one --listen")
    shape = Shape(rtt=args.rtt_ms / 1000, conn_rate=args.conn_mibs * MiB, total_rate=args.total_mibs * MiB)
    asyncio.run(serve(shape, args.log_dir, args.control, listens))


if __name__ == "__main__":
    main()
