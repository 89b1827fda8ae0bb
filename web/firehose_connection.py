"""One firehose consumer connection: replay from the log, hand-off to live, keep-alive pings, and its client reader.

``Connection`` is the writer (the request greenlet, the only one that writes to the socket)
plus one reader greenlet that discards client messages (frames over ``max_client_frame_bytes``
close the connection), answers pings through the writer and notices the client's close.
Frames are pre-built websocket frames (the broadcaster frames each live event once), written
straight to the socket joined into ~1 MiB writes: one send per batch, not one per frame. The
behaviour it implements is described in ``web.firehose``.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.lock
from prometheus_client import Gauge

from actors.broadcaster import Consumer, ConsumerRegistry, websocket_frame, websocket_header
from protocol.frames import error_frame, info_frame

log = logging.getLogger(__name__)

_SEND_CHUNK_BYTES = 1 << 20  # bytes joined into one sendall
_TAKE_FRAMES = 4096  # live frames taken from the consumer queue at once
_READ_RECORDS = 1000  # records per read_after call during replay
_IDLE_WAIT_SECONDS = 30.0  # a waiting writer re-checks its state this often
_SLOT_POLL_SECONDS = 1.0  # a connection waiting for a replay slot checks its client this often
_FUTURE_POLL_SECONDS = 0.05  # a connection whose cursor is ahead of the log checks it this often

REPLAYS = Gauge("skyrelay_firehose_replays", "Firehose connections replaying from a cursor, or waiting to", ["state"])

_OP_CONTINUATION, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_CLIENT_OPCODES = frozenset((_OP_CONTINUATION, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG))
_CLOSE_GOING_AWAY, _CLOSE_PROTOCOL_ERROR, _CLOSE_POLICY, _CLOSE_TOO_BIG = 1001, 1002, 1008, 1009


class EventLogReader(Protocol):
    """What the firehose needs from the event log."""

    @property
    def last_seq(self) -> int: ...

    @property
    def first_seq(self) -> int: ...

    def read_after(self, cursor: int, max_records: int = 1000) -> list[tuple[int, bytes]]: ...


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    buffer_frames: int
    buffer_bytes: int
    stall_seconds: float
    max_client_frame_bytes: int
    ping_seconds: float
    future_wait_seconds: float = 0.0  # a cursor ahead of the log waits this long for it (fan-out nodes)


class ReplaySlots:
    """At most ``size`` replays at once; later connections wait their turn (a gevent semaphore)."""

    def __init__(self, size: int) -> None:
        self._semaphore = gevent.lock.BoundedSemaphore(size)

    def acquire(self, check: Callable[[], None]) -> None:
        """Wait for a slot, calling ``check`` (which raises to give up) every ``_SLOT_POLL_SECONDS``."""
        if not self._semaphore.acquire(blocking=False):
            waiting = REPLAYS.labels("waiting")
            waiting.inc()
            try:
                while not self._semaphore.acquire(timeout=_SLOT_POLL_SECONDS):
                    check()
            finally:
                waiting.dec()
        REPLAYS.labels("running").inc()

    def release(self) -> None:
        REPLAYS.labels("running").dec()
        self._semaphore.release()


class _Disconnect(Exception):
    """The connection is over: client gone, client closed, or the relay closed it."""


class _SendStalled(Exception):
    """The socket accepted no bytes for the stall timeout."""


class Connection:
    """One firehose consumer: replay, hand-off, live fan-out, and its client reader."""

    def __init__(
        self,
        ws: Any,
        log_reader: EventLogReader,
        registry: ConsumerRegistry,
        remote: str,
        limits: ConnectionLimits,
        slots: ReplaySlots,
        user_agent: str = "",
    ) -> None:
        self._ws = ws
        self._user_agent = user_agent
        self._socket = ws.handler.socket
        try:  # small frames must not wait for the client's delayed ACK (Nagle)
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._log = log_reader
        self._registry = registry
        self._remote = remote
        self._limits = limits
        self._slots = slots
        self._consumer: Consumer | None = None
        self._last_write = self._last_heard = time.monotonic()
        self._ping_at: float | None = None  # when the unanswered ping was sent
        self._pong: bytes | None = None  # the pong frame answering the latest client ping
        self._client_close: bytes | None = None  # the close payload to echo
        self._client_gone = False  # EOF or socket error on read
        self._reader_failed: tuple[str, int] | None = None  # (cut reason, close code)

    # -- writer ------------------------------------------------------------------------

    def serve(self, cursor: int | None) -> None:
        """Run the connection until it ends; never raises for a client going away."""
        limits = self._limits
        consumer = self._consumer = self._registry.register(
            buffer_frames=limits.buffer_frames, buffer_bytes=limits.buffer_bytes, remote=self._remote
        )
        consumer.user_agent, consumer.cursor = self._user_agent, cursor  # shown to operators
        reader = gevent.spawn(self._read_loop)
        log.debug("firehose consumer connected remote=%s cursor=%s", self._remote, cursor)
        try:
            self._run(consumer, cursor)
        except (_Disconnect, OSError) as exc:
            log.debug("firehose consumer disconnected remote=%s reason=%s", self._remote, exc)
        except _SendStalled:
            consumer.cut("send_stalled")
            log.info("firehose consumer cut reason=send_stalled remote=%s", self._remote)
            self._shutdown()
        except Exception:
            log.exception("firehose connection failed remote=%s", self._remote)
            self._shutdown()
        finally:
            self._registry.unregister(consumer)
            reader.kill(block=False)
            self._ws.closed = True  # we sent (or could not send) the close frame ourselves

    def _run(self, consumer: Consumer, cursor: int | None) -> None:
        last_sent = -1
        if cursor is not None:
            newest = self._log.last_seq
            if cursor > newest and self._limits.future_wait_seconds > 0:
                newest = self._wait_for_log(cursor)
            if cursor > newest:
                self._write_frame(error_frame("FutureCursor", f"cursor {cursor} is ahead of the newest event {newest}"))
                self._close(_CLOSE_POLICY, "FutureCursor")
                return
            gated = cursor < newest  # a cursor at the head has nothing to replay: no slot needed
            if gated:
                self._slots.acquire(self._check_client)
            try:
                last_sent = self._replay(cursor)  # catch up without buffering live frames
                consumer.start_buffering()
                last_sent = self._replay(last_sent)  # events that became durable meanwhile
            finally:
                if gated:
                    self._slots.release()
        else:
            consumer.start_buffering()
        self._live(consumer, last_sent)

    def _wait_for_log(self, cursor: int) -> int:
        """The log's newest seq once it reaches ``cursor`` or ``future_wait_seconds`` have passed.

        A fan-out node a moment behind its peers must not tell a consumer arriving from one of
        them that its cursor is in the future.
        """
        deadline = time.monotonic() + self._limits.future_wait_seconds
        while self._log.last_seq < cursor and time.monotonic() < deadline:
            self._check_client()
            gevent.sleep(_FUTURE_POLL_SECONDS)
        return self._log.last_seq

    def _replay(self, after: int) -> int:
        """Send every logged frame with seq > ``after`` until the log is exhausted; the last seq sent."""
        last = after
        while True:
            self._check_client()
            first = self._log.first_seq
            if first > 0 and last < first - 1:
                message = f"cursor {last} is older than the oldest retained event {first}; replaying from there"
                self._write_frame(info_frame("OutdatedCursor", message))
            records = self._log.read_after(last, _READ_RECORDS)
            if not records:
                return last
            parts: list[bytes] = []
            size = count = 0
            for seq, frame in records:
                parts.append(websocket_header(len(frame)))
                parts.append(frame)
                size += len(frame)
                count += 1
                if size >= _SEND_CHUNK_BYTES:
                    self._send(parts, count)
                    last = seq
                    parts, size, count = [], 0, 0
                    gevent.sleep(0)  # a socket that always accepts must not keep the others waiting
            if parts:
                self._send(parts, count)
            last = records[-1][0]
            gevent.sleep(0)

    def _live(self, consumer: Consumer, last_sent: int) -> None:
        while True:
            batch = consumer.take(_TAKE_FRAMES, self._keepalive_wait())
            if batch and batch[0][0] <= last_sent:
                batch = [item for item in batch if item[0] > last_sent]
            if batch:
                parts: list[bytes] = []
                size = 0
                for _, wire in batch:
                    parts.append(wire)
                    size += len(wire)
                    if size >= _SEND_CHUNK_BYTES:
                        self._send(parts, len(parts))
                        parts, size = [], 0
                if parts:
                    self._send(parts, len(parts))
                last_sent = batch[-1][0]
            self._check_client()
            reason = consumer.cut_reason
            if reason is not None:
                self._write_frame(error_frame("ConsumerTooSlow", "consumer fell too far behind the live stream"))
                self._close(_CLOSE_POLICY, "ConsumerTooSlow")
                return
            if consumer.closed:  # closed without a cut: the relay is shutting down
                self._close(_CLOSE_GOING_AWAY, "relay shutting down")
                return
            self._keepalive(consumer)

    def _keepalive_wait(self) -> float:
        """Seconds until the next ping is due, or the outstanding one expires."""
        due = (self._ping_at if self._ping_at is not None else self._last_write) + self._limits.ping_seconds
        return max(0.01, min(_IDLE_WAIT_SECONDS, due - time.monotonic()))

    def _keepalive(self, consumer: Consumer) -> None:
        """Ping an idle consumer; cut one that answered nothing to the last ping in time."""
        now = time.monotonic()
        ping_seconds = self._limits.ping_seconds
        if self._ping_at is not None:
            if self._last_heard >= self._ping_at:
                self._ping_at = None  # answered
            elif now - self._ping_at >= ping_seconds:
                consumer.cut("ping_timeout")
                log.info("firehose consumer cut reason=ping_timeout remote=%s", self._remote)
                self._close(_CLOSE_GOING_AWAY, "ping timeout")
                raise _Disconnect("ping timeout")
        if self._ping_at is None and now - self._last_write >= ping_seconds:
            self._write_raw(websocket_frame(b"", _OP_PING))
            self._ping_at = now

    def _check_client(self) -> None:
        """Send queued pongs; end the connection if the reader saw a close, EOF or a bad frame."""
        pong, self._pong = self._pong, None
        if pong is not None:
            self._write_raw(pong)
        if self._reader_failed is not None:
            reason, code = self._reader_failed
            if self._consumer is not None:
                self._consumer.cut(reason)
            log.debug("firehose consumer cut reason=%s remote=%s", reason, self._remote)
            self._close(code, reason)
            raise _Disconnect(reason)
        if self._client_gone:
            raise _Disconnect("client gone")
        if self._client_close is not None:
            self._write_raw(websocket_frame(self._client_close, _OP_CLOSE))
            raise _Disconnect("client closed")

    def _send(self, parts: list[bytes], frames: int) -> None:
        self._write_raw(b"".join(parts))
        if self._consumer is not None:
            self._consumer.sent(frames)

    def _write_frame(self, payload: bytes) -> None:
        self._write_raw(websocket_frame(payload))

    def _write_raw(self, data: bytes) -> None:
        """Write ``data`` whole; ``_SendStalled`` if the socket accepts no byte for the stall timeout."""
        view = memoryview(data)
        try:
            sent = self._socket.send(view, 0, timeout=0.0)  # gevent: fail instead of waiting
        except BlockingIOError:
            sent = 0
        while sent < len(view):
            view = view[sent:]
            # gevent's send waits for the socket to be writable, then sends what fits: the
            # timeout can only fire while waiting, so it measures time without progress.
            with gevent.Timeout(self._limits.stall_seconds, _SendStalled):
                sent = self._socket.send(view)
        self._last_write = time.monotonic()

    def _close(self, code: int, reason: str) -> None:
        self._write_raw(websocket_frame(struct.pack("!H", code) + reason.encode()[:120], _OP_CLOSE))

    def _shutdown(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reader ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        """Read and discard client frames; queue pongs; note close, EOF and bad frames; wake the writer."""
        read: Callable[[int], bytes] = self._ws.stream.read
        try:
            while True:
                opcode, payload = self._read_frame(read)
                self._last_heard = time.monotonic()  # a pong, or anything: the client is alive
                if opcode == _OP_PING:
                    self._pong = websocket_frame(payload, _OP_PONG)  # only the latest ping needs an answer
                    self._wake()
                elif opcode == _OP_CLOSE:
                    self._client_close = payload[:2] if len(payload) >= 2 else b""
                    break
        except _ClientFrameTooBig:
            self._reader_failed = ("client_frame_too_big", _CLOSE_TOO_BIG)
        except _ClientProtocolError:
            self._reader_failed = ("client_protocol_error", _CLOSE_PROTOCOL_ERROR)
        except (EOFError, OSError):
            self._client_gone = True
        self._wake()

    def _wake(self) -> None:
        if self._consumer is not None:
            self._consumer.wake()

    def _read_frame(self, read: Callable[[int], bytes]) -> tuple[int, bytes]:
        head = _read_exactly(read, 2)
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", _read_exactly(read, 2))[0]
        elif length == 127:
            length = struct.unpack("!Q", _read_exactly(read, 8))[0]
        if length > self._limits.max_client_frame_bytes:
            raise _ClientFrameTooBig
        if opcode not in _CLIENT_OPCODES or not head[1] & 0x80 or (opcode >= _OP_CLOSE and length > 125):
            raise _ClientProtocolError  # client frames are masked; control frames are small
        mask = _read_exactly(read, 4)
        payload = _read_exactly(read, length) if length else b""
        if opcode in (_OP_PING, _OP_CLOSE):
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return opcode, payload


class _ClientFrameTooBig(Exception):
    """A client frame exceeds ``max_client_frame_bytes``."""


class _ClientProtocolError(Exception):
    """A client frame breaks RFC 6455 (unmasked, or an oversized control frame)."""


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    data = read(size)
    if len(data) != size:
        raise EOFError("client closed the connection")
    return data
