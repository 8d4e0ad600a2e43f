"""The WAN hop's shaping arithmetic and HTTP framing, as pure functions (no sockets, no
clocks): ``python3 -m pytest -q bench/test_wanhop.py``."""

from __future__ import annotations

import pytest

from bench.wanhop import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    Bucket,
    MessageStream,
    MiB,
    body_framing,
    bucket_take,
    departure,
)

RATE = 25 * MiB
BURST = 64 * 1024


def test_a_full_bucket_lets_its_burst_through_at_once() -> None:
    level, stamp, departs = bucket_take(BURST, 0.0, 10.0, BURST, RATE, BURST)
    assert (level, stamp, departs) == (0, 10.0, 10.0)


def test_more_than_the_bucket_holds_leaves_at_the_rate() -> None:
    _, _, departs = bucket_take(BURST, 0.0, 10.0, MiB, RATE, BURST)
    assert departs == pytest.approx(10.0 + (MiB - BURST) / RATE)


def test_debts_queue_later_senders_behind_earlier_ones() -> None:
    bucket = Bucket(RATE, BURST)
    first = bucket.take(10.0, MiB + BURST)
    second = bucket.take(10.0, MiB)  # same instant: waits for the first MiB and its own
    assert first == pytest.approx(10.0 + 1 / 25)
    assert second == pytest.approx(10.0 + 2 / 25)


def test_an_idle_bucket_refills_only_up_to_its_burst() -> None:
    level, _, _ = bucket_take(-MiB, 0.0, 1000.0, 0, RATE, BURST)
    assert level == BURST


def test_a_steady_sender_gets_the_rate() -> None:
    """256 KiB reads, each sent when the previous one has left: 100 MiB take 4 s at 25 MiB/s."""
    bucket = Bucket(RATE, BURST)
    now = 0.0
    for _ in range(400):
        now = bucket.take(now, 256 * 1024)
    assert now == pytest.approx((100 * MiB - BURST) / RATE)


def test_departure_is_bounded_by_the_aggregate_and_the_handshake() -> None:
    conn, total = Bucket(RATE, BURST), Bucket(8 * MiB, 0)
    assert departure(1.0, MiB, 0.0, [conn, total]) == pytest.approx(1.0 + 1 / 8)
    assert departure(1.0, 10, 1.04, []) == 1.04


class Recorder:
    def __init__(self) -> None:
        self.heads: list[str] = []
        self.done: list[int] = []

    def head(self, line: str, headers: dict[str, str]) -> int:
        self.heads.append(line)
        framing = body_framing(headers)
        return NO_BODY if framing == UNTIL_CLOSE and not line.startswith("HTTP/") else framing

    def stream(self) -> MessageStream:
        return MessageStream(self.head, self.done.append)


def feed_in_pieces(stream: MessageStream, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        stream.feed(data[i:i + size])


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 100_000])
def test_responses_are_delimited_however_the_reads_split_them(piece: int) -> None:
    body = b"x" * 3000
    chunked = b"5\r\nhello\r\n10;ext=1\r\n" + b"y" * 16 + b"\r\n0\r\nTrailer: t\r\n\r\n"
    data = (b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + body
            + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
            + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            + b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")  # a HEAD's: no body follows
    framings = iter([3000, CHUNKED, 0, NO_BODY])  # what the link decides (the last answers a HEAD)
    done: list[int] = []
    stream = MessageStream(lambda line, headers: next(framings), done.append)
    feed_in_pieces(stream, data, piece)
    assert done == [3000, 21, 0, 0]
    assert not stream.in_message and not stream.opaque


def test_requests_without_a_body_and_with_one() -> None:
    rec = Recorder()
    stream = rec.stream()
    stream.feed(b"GET /v2/a/blobs/sha256:1 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"PUT /v2/a/blobs/uploads/x HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd"
                b"HEAD /v2/a/manifests/t HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert rec.heads == ["GET /v2/a/blobs/sha256:1 HTTP/1.1", "PUT /v2/a/blobs/uploads/x HTTP/1.1",
                         "HEAD /v2/a/manifests/t HTTP/1.1"]
    assert rec.done == [0, 4, 0]
    assert body_framing({}) == UNTIL_CLOSE


def test_a_body_until_close_ends_at_eof() -> None:
    rec = Recorder()
    stream = rec.stream()
    stream.feed(b"HTTP/1.0 200 OK\r\n\r\n" + b"z" * 10)
    stream.feed(b"z" * 5)
    assert rec.done == []
    stream.feed_eof()
    assert rec.done == [15]


def test_garbage_turns_counting_off_without_raising() -> None:
    rec = Recorder()
    stream = rec.stream()
    stream.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n")
    assert stream.opaque
    stream.feed(b"anything")
    assert rec.done == []
