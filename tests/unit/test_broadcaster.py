"""Broadcaster fan-out: every consumer gets every batch in order; a stuck consumer is cut, others are not slowed.

The actor runs on a real thread here (no gevent), with fake writers: threads that drain a
consumer into a socketpair. A consumer whose peer never reads blocks its writer in ``sendall``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import REGISTRY

from actors.broadcaster import (
    Broadcaster,
    Consumer,
    ConsumerRegistry,
    fan_out,
    websocket_frame,
    websocket_header,
)
from actors.messages_broadcast import Broadcast

WAIT_S = 10.0


def batches(first: int, count: int, size: int, frame_bytes: int = 64) -> list[Broadcast]:
    """``count`` consecutive events from seq ``first`` in batches of ``size``; each frame names its seq."""
    out = []
    for start in range(first, first + count, size):
        seqs = range(start, min(start + size, first + count))
        out.append(Broadcast(tuple((s, struct.pack("!Q", s) + b"x" * (frame_bytes - 8)) for s in seqs)))
    return out


def parse_ws_stream(data: bytes) -> list[bytes]:
    """Payloads of the unmasked server frames in ``data`` (which must end on a frame boundary)."""
    out, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0x82, "expected a final binary frame"
        length, pos = data[pos + 1] & 0x7F, pos + 2
        if length == 126:
            length, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif length == 127:
            length, pos = struct.unpack_from("!Q", data, pos)[0], pos + 8
        out.append(data[pos : pos + length])
        pos += length
    return out


def cut_count(reason: str) -> float:
    return REGISTRY.get_sample_value("skyrelay_consumers_cut_total", {"reason": reason}) or 0.0


def consumers_gauge() -> float:
    return REGISTRY.get_sample_value("skyrelay_consumers") or 0.0


class SocketWriter:
    """A fake firehose writer: drains ``consumer`` into one end of a socketpair until it is cut or closed."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.server_end, self.client_end = socket.socketpair()
        self.server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.client_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while self.consumer.cut_reason is None and not self.stopping.is_set():
                batch = self.consumer.take(1000, timeout=0.2)
                if batch:
                    self.server_end.sendall(b"".join(wire for _, wire in batch))
                    self.consumer.sent(len(batch))
        except OSError:
            pass

    def read_all(self, frames: int) -> list[bytes]:
        """Read from the client end until ``frames`` complete frames have arrived."""
        out: list[bytes] = []
        data = b""
        self.client_end.settimeout(WAIT_S)
        while len(out) < frames:
            chunk = self.client_end.recv(1 << 16)
            assert chunk, "writer closed early"
            data += chunk
            end = complete_prefix(data)
            out += parse_ws_stream(data[:end])
            data = data[end:]
        return out

    def close(self) -> None:
        self.stopping.set()
        self.consumer.wake()
        for end in (self.server_end, self.client_end):
            end.shutdown(socket.SHUT_RDWR)  # unblocks a writer stuck in sendall
        self.server_end.close()
        self.client_end.close()
        self.thread.join(WAIT_S)


def complete_prefix(data: bytes) -> int:
    """Length of the complete frames at the start of ``data``."""
    end = pos = 0
    while pos + 2 <= len(data):
        length, head = data[pos + 1] & 0x7F, 2
        if length == 126:
            if pos + 4 > len(data):
                break
            length, head = struct.unpack_from("!H", data, pos + 2)[0], 4
        if pos + head + length > len(data):
            break
        pos += head + length
        end = pos
    return end


@pytest.fixture
def registry() -> Iterator[ConsumerRegistry]:
    reg = ConsumerRegistry()
    yield reg
    for consumer in reg.consumers():
        reg.unregister(consumer)


def test_websocket_header_lengths() -> None:
    assert websocket_header(0) == b"\x82\x00"
    assert websocket_header(125) == b"\x82\x7d"
    assert websocket_header(126) == b"\x82\x7e\x00\x7e"
    assert websocket_header(65535) == b"\x82\x7e\xff\xff"
    assert websocket_header(65536) == b"\x82\x7f" + struct.pack("!Q", 65536)
    assert websocket_frame(b"ab", 0xA) == b"\x8a\x02ab"
    payloads = [b"", b"a" * 125, b"b" * 126, b"c" * 70_000]
    assert parse_ws_stream(b"".join(websocket_frame(p) for p in payloads)) == payloads


def test_every_consumer_gets_every_batch_in_order(registry: ConsumerRegistry) -> None:
    consumers = [registry.register(buffer_frames=1000) for _ in range(3)]
    for consumer in consumers:
        consumer.start_buffering()
    ref = Broadcaster.start(registry)
    for message in batches(1, 500, 7):
        ref.tell(message)
    ref.stop(timeout=WAIT_S)  # processed after every Broadcast told before it
    for consumer in consumers:
        items = consumer.take(10_000)
        assert [seq for seq, _ in items] == list(range(1, 501))
        assert all(parse_ws_stream(wire)[0][:8] == struct.pack("!Q", seq) for seq, wire in items)
        assert consumer.cut_reason is None


def test_consumer_ignores_broadcasts_until_buffering(registry: ConsumerRegistry) -> None:
    consumer = registry.register(buffer_frames=10)
    for message in batches(1, 50, 5):
        fan_out(registry, message.events)
    assert consumer.queued == 0
    assert consumer.cut_reason is None
    consumer.start_buffering()
    fan_out(registry, batches(51, 3, 3)[0].events)
    assert [seq for seq, _ in consumer.take(100)] == [51, 52, 53]


def test_overflow_cuts_and_unregisters(registry: ConsumerRegistry) -> None:
    before = cut_count("too_slow")
    consumer = registry.register(buffer_frames=10)
    consumer.start_buffering()
    fan_out(registry, batches(1, 8, 8)[0].events)
    assert consumer.cut_reason is None and consumer.queued == 8
    fan_out(registry, batches(9, 3, 3)[0].events)  # 11 > 10
    assert consumer.cut_reason == "too_slow"
    assert consumer.queued == 0, "a cut consumer's queue is dropped at once"
    assert consumer not in registry.consumers()
    assert cut_count("too_slow") == before + 1
    assert consumer.take(100, timeout=WAIT_S) == [], "a cut consumer's writer is not kept waiting"


def test_overflow_in_bytes_cuts_before_the_frame_bound(registry: ConsumerRegistry) -> None:
    """Large frames: the byte bound cuts a consumer long before its frame bound would."""
    before = cut_count("too_slow")
    consumer = registry.register(buffer_frames=20_000, buffer_bytes=1_000_000)
    consumer.start_buffering()
    big = [(seq, b"x" * 300_000) for seq in range(1, 4)]
    fan_out(registry, big)
    assert consumer.cut_reason is None and consumer.queued_bytes > 900_000
    assert [seq for seq, _ in consumer.take(2)] == [1, 2]  # taking frees their bytes
    assert consumer.queued_bytes < 400_000
    fan_out(registry, [(4, b"x" * 300_000), (5, b"x" * 300_000)])
    assert consumer.cut_reason is None
    fan_out(registry, [(6, b"x" * 300_000)])  # 4 x 300 KB queued > 1 MB
    assert consumer.cut_reason == "too_slow" and consumer.queued_bytes == 0
    assert cut_count("too_slow") == before + 1


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_stuck_consumer_is_cut_while_others_get_everything(registry: ConsumerRegistry) -> None:
    before = cut_count("too_slow")
    stuck = registry.register(buffer_frames=100)
    fast = [registry.register(buffer_frames=100) for _ in range(2)]
    writers = [SocketWriter(c) for c in (stuck, *fast)]  # nobody reads the stuck one's client end
    received: dict[int, list[bytes]] = {}

    def read(index: int) -> None:
        received[index] = writers[index].read_all(2000)

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in (1, 2)]
    for thread in readers:
        thread.start()
    for consumer in (stuck, *fast):
        consumer.start_buffering()
    ref = Broadcaster.start(registry)
    try:
        told = 0

        def fast_caught_up() -> bool:
            return all(c.frames_sent >= told - 50 for c in fast)

        for message in batches(1, 2000, 10, frame_bytes=1024):
            # A sequencer no faster than the healthy consumers: the stuck one still overflows.
            wait_until(fast_caught_up, "the fast consumers to drain")
            ref.tell(message)
            told += len(message.events)
        ref.stop(timeout=WAIT_S)  # raises if the broadcaster got stuck behind the blocked writer
        for thread in readers:
            thread.join(WAIT_S)
        assert stuck.cut_reason == "too_slow"
        assert stuck not in registry.consumers()
        assert cut_count("too_slow") == before + 1
        for index in (1, 2):
            assert [struct.unpack("!Q", f[:8])[0] for f in received[index]] == list(range(1, 2001))
            assert writers[index].consumer.cut_reason is None
        assert writers[0].thread.is_alive(), "the stuck writer is still blocked in sendall"
    finally:
        for writer in writers:
            writer.close()


def test_registry_gauge_and_idempotent_unregister(registry: ConsumerRegistry) -> None:
    base = consumers_gauge()
    a = registry.register()
    b = registry.register(buffer_frames=5)
    assert len(registry) == 2 and consumers_gauge() == base + 2
    registry.unregister(a)
    registry.unregister(a)
    assert registry.consumers() == (b,) and consumers_gauge() == base + 1
    b.start_buffering()
    fan_out(registry, batches(1, 2, 2)[0].events)
    registry.unregister(b)
    assert b.queued == 0 and consumers_gauge() == base
    assert b.offer(batches(3, 1, 1)[0].events) is False


def test_take_returns_on_wake_and_caps_its_batch(registry: ConsumerRegistry) -> None:
    consumer = registry.register(buffer_frames=100)
    consumer.start_buffering()
    timer = threading.Timer(0.05, consumer.wake)
    timer.start()
    assert consumer.take(10, timeout=WAIT_S) == []
    timer.join()
    fan_out(registry, batches(1, 25, 25)[0].events)
    assert [s for s, _ in consumer.take(10)] == list(range(1, 11))
    assert [s for s, _ in consumer.take(100)] == list(range(11, 26))
    assert consumer.cut("send_stalled") is True
    assert consumer.cut("too_slow") is False
    assert consumer.cut_reason == "send_stalled"


def test_consumer_rejects_a_zero_buffer() -> None:
    with pytest.raises(ValueError):
        Consumer(0)
