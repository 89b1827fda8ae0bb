"""Fan-out of durable event frames to every firehose consumer, never blocking on any of them.

The ``Broadcaster`` actor receives ``Broadcast`` batches from the sequencer, frames each event
once as a websocket binary message and appends the batch to every registered consumer's
bounded queue (in frames and in bytes), then wakes the consumer's writer. A consumer whose
queue would overflow either bound is cut (reason ``too_slow``): its queue is dropped, it is
unregistered, and its writer is woken to send ``ConsumerTooSlow`` and close. The broadcaster
does no I/O and takes no lock that a writer can hold across I/O, so a stuck socket can never
stall it.

The web layer registers, drains and unregisters consumers through the shared
``ConsumerRegistry`` directly (no ``ask``). Registry and consumers are safe to use from
greenlets and from real threads (the unit tests run the actor on a thread): the ``threading``
primitives are looked up at run time, so under gevent monkey-patching they are gevent's.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import pykka
from prometheus_client import Counter, Gauge

from actors import tracing
from actors.messages_broadcast import Broadcast

log = logging.getLogger(__name__)

#: Frames a consumer may have queued (not yet taken by its writer) before it is cut.
DEFAULT_BUFFER_FRAMES = 20_000
#: Bytes of frames a consumer may have queued before it is cut (whichever bound it reaches first).
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024

CONSUMERS = Gauge("skyrelay_consumers", "Firehose consumers registered with the broadcaster")
FRAMES_SENT = Counter("skyrelay_consumer_frames_sent_total", "Frames written to firehose consumers")
CUTS = Counter("skyrelay_consumers_cut_total", "Firehose consumers disconnected by the relay", ["reason"])

#: ``(seq, websocket frame bytes)``: what a consumer queue holds.
WireItem = tuple[int, bytes]

_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


def websocket_header(length: int, opcode: int = 0x2) -> bytes:
    """The header of one unmasked, final server-to-client websocket frame (binary by default)."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return _HEAD16.pack(first, 126, length)
    return _HEAD64.pack(first, 127, length)


def websocket_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """``payload`` as one complete websocket frame, ready to write to the socket."""
    return websocket_header(len(payload), opcode) + payload


class Consumer:
    """One firehose connection's bounded queue between the broadcaster and its writer.

    A new consumer ignores broadcasts until ``start_buffering`` (its writer replays from the log
    first). The broadcaster calls ``offer``; the writer calls ``take`` and ``sent``; either side
    may ``cut`` it. ``take`` returns early when ``wake`` is called, so the web layer can also use
    the consumer to wake its writer for its own reasons (a client ping or close).
    """

    __slots__ = (
        "_accepting",
        "_closed",
        "_cut_reason",
        "_lock",
        "_pending",
        "_pending_bytes",
        "_wake",
        "capacity",
        "capacity_bytes",
        "connected_at",
        "cursor",
        "frames_sent",
        "remote",
        "user_agent",
    )

    def __init__(self, capacity: int, remote: str = "", capacity_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        if capacity < 1 or capacity_bytes < 1:
            raise ValueError("consumer buffer must hold at least one frame")
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self._pending_bytes = 0
        self.remote = remote
        self.connected_at = time.time()  # for the admin consumer list
        self.user_agent = ""  # for the admin consumer list (set by the web layer)
        self.cursor: int | None = None  # the cursor it asked for (None: live only)
        self.frames_sent = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: list[WireItem] = []
        self._accepting = False
        self._cut_reason: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Consumer(remote={self.remote!r}, queued={len(self._pending)}, cut={self._cut_reason!r})"

    @property
    def cut_reason(self) -> str | None:
        """Why the relay disconnects this consumer (``too_slow``, ...), or ``None``."""
        return self._cut_reason

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def queued_bytes(self) -> int:
        return self._pending_bytes

    # -- broadcaster side --------------------------------------------------------------

    def offer(self, items: Sequence[WireItem], nbytes: int | None = None) -> bool:
        """Queue ``items`` (``nbytes`` in all, counted if not given) without blocking; ``False`` once cut or closed."""
        if nbytes is None:
            nbytes = sum(len(wire) for _, wire in items)
        with self._lock:
            if not self._accepting:
                return self._cut_reason is None and not self._closed
            if len(self._pending) + len(items) > self.capacity or self._pending_bytes + nbytes > self.capacity_bytes:
                cut_now = self._cut_locked("too_slow")
            else:
                self._pending.extend(items)
                self._pending_bytes += nbytes
                cut_now = False
        self._wake.set()
        if cut_now:
            CUTS.labels(reason="too_slow").inc()
            log.info(
                "firehose consumer cut reason=too_slow remote=%s capacity=%d capacity_bytes=%d",
                self.remote,
                self.capacity,
                self.capacity_bytes,
            )
            return False
        return True

    # -- writer side -------------------------------------------------------------------

    def start_buffering(self) -> None:
        """Accept broadcasts from now on (the writer has caught up with the log, or wants live only)."""
        with self._lock:
            if self._cut_reason is None and not self._closed:
                self._accepting = True

    def take(self, max_frames: int, timeout: float | None = None) -> list[WireItem]:
        """The oldest queued frames (at most ``max_frames``), waiting up to ``timeout`` for any.

        Returns an empty list on timeout, on ``wake``, or once the consumer is cut or closed.
        """
        with self._lock:
            idle = not self._pending and self._cut_reason is None and not self._closed
            if idle:
                self._wake.clear()
        if idle:
            self._wake.wait(timeout)
        with self._lock:
            pending = self._pending
            if len(pending) <= max_frames:
                self._pending = []
                self._pending_bytes = 0
                return pending
            batch = pending[:max_frames]
            del pending[:max_frames]
            self._pending_bytes -= sum(len(wire) for _, wire in batch)
            return batch

    @property
    def closed(self) -> bool:
        """The relay closed this consumer (shutting down); its writer should say goodbye."""
        return self._closed

    def sent(self, frames: int) -> None:
        """Record that the writer wrote ``frames`` frames to the client."""
        self.frames_sent += frames
        FRAMES_SENT.inc(frames)

    def wake(self) -> None:
        """Make a waiting ``take`` return now."""
        self._wake.set()

    def cut(self, reason: str) -> bool:
        """Disconnect this consumer for ``reason`` (counted); ``False`` if it was already cut."""
        with self._lock:
            cut_now = self._cut_locked(reason)
        self._wake.set()
        if cut_now:
            CUTS.labels(reason=reason).inc()
        return cut_now

    def close(self) -> None:
        """Stop accepting and drop the queue (the connection is over)."""
        with self._lock:
            self._closed = True
            self._accepting = False
            self._pending = []
            self._pending_bytes = 0
        self._wake.set()

    def _cut_locked(self, reason: str) -> bool:
        if self._cut_reason is not None or self._closed:
            return False
        self._cut_reason = reason
        self._accepting = False
        self._pending = []
        self._pending_bytes = 0
        return True


class ConsumerRegistry:
    """The set of live consumers, shared by the Broadcaster and the web layer.

    Registration is copy-on-write, so the broadcaster iterates a snapshot without a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._consumers: tuple[Consumer, ...] = ()

    def __len__(self) -> int:
        return len(self._consumers)

    def register(
        self, *, buffer_frames: int = DEFAULT_BUFFER_FRAMES, buffer_bytes: int = DEFAULT_BUFFER_BYTES, remote: str = ""
    ) -> Consumer:
        """A new consumer holding at most ``buffer_frames`` queued frames of ``buffer_bytes`` (not buffering yet)."""
        consumer = Consumer(buffer_frames, remote, buffer_bytes)
        with self._lock:
            self._consumers = (*self._consumers, consumer)
        CONSUMERS.inc()
        return consumer

    def unregister(self, consumer: Consumer) -> None:
        """Remove and close ``consumer``; removing one that is already gone does nothing."""
        with self._lock:
            if consumer not in self._consumers:
                return
            self._consumers = tuple(c for c in self._consumers if c is not consumer)
        consumer.close()
        CONSUMERS.dec()

    def consumers(self) -> tuple[Consumer, ...]:
        return self._consumers


def fan_out(registry: ConsumerRegistry, events: Sequence[tuple[int, bytes]]) -> None:
    """Frame ``events`` once and queue them on every consumer; unregister those cut for it."""
    if not events:
        return
    items = [(seq, websocket_header(len(frame)) + frame) for seq, frame in events]
    nbytes = sum(len(wire) for _, wire in items)
    dropped = [consumer for consumer in registry.consumers() if not consumer.offer(items, nbytes)]
    for consumer in dropped:
        registry.unregister(consumer)


class Broadcaster(pykka.ThreadingActor):
    """Fans each durable ``Broadcast`` batch out to the consumers in ``registry``."""

    def __init__(self, registry: ConsumerRegistry) -> None:
        super().__init__()
        self.registry = registry

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Broadcast):
            fan_out(self.registry, message.events)
            if tracing.ENABLED:
                tracing.events_broadcast(message.events)
            # Let the consumer writers run: gevent.sleep(0) once monkey-patched, a GIL yield otherwise.
            time.sleep(0)
            return None
        return super().on_receive(message)
