"""Idle keep-alive HTTP connections of one outbound client, by (scheme, host, port).

A DID document fetch used to open a connection (TCP, and TLS against the public PLC
directory) for a few hundred bytes; kept connections spare that for every fetch after the
first. Rules:

- A connection is pooled only after a whole answer was read from it and the answer allows
  reuse (``actors.outbound_http.reusable``), so the next request starts on a clean stream.
- Bounded: at most ``max_per_key`` idle connections to one host and ``max_idle`` in all (the
  oldest is closed to make room); one idle longer than ``idle_seconds`` is closed, never reused.
- A connection taken from the pool is probed without blocking: if the server has closed it or
  sent anything unasked, it is closed and the next one tried.
- The pool belongs to one client, so it never hands a connection made under one address
  policy to a client with another (``OutboundClient.trusting`` makes a new pool).
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import Counter

from actors.outbound_errors import OutboundError
from actors.outbound_http import SocketReader

PoolKey = tuple[str, str, int]  # scheme, lower-cased host, port

REUSED_TOTAL = Counter("skyrelay_outbound_connections_reused_total", "HTTP requests sent on a kept-alive connection")


class PooledConnection(Protocol):
    """What the pool needs of a connection (``actors.outbound.Connection`` has it)."""

    sock: socket.socket
    raw: SocketReader
    reader: io.BufferedReader[Any]

    def close(self) -> None: ...


C = TypeVar("C", bound=PooledConnection)


class ConnectionPool(Generic[C]):
    """Idle connections, most recently returned first within a key; thread- and greenlet-safe."""

    def __init__(
        self,
        *,
        max_per_key: int = 8,
        max_idle: int = 64,
        idle_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_per_key = max_per_key
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # (key, sequence number) -> (connection, returned at); insertion order is age order
        self._idle: OrderedDict[tuple[PoolKey, int], tuple[C, float]] = OrderedDict()
        self._per_key: dict[PoolKey, list[int]] = {}
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, key: PoolKey) -> C | None:
        """A live idle connection to ``key``, or ``None``; stale ones met on the way are closed."""
        while True:
            with self._lock:
                numbers = self._per_key.get(key)
                if not numbers:
                    return None
                number = numbers.pop()
                if not numbers:
                    del self._per_key[key]
                conn, since = self._idle.pop((key, number))
            if self._clock() - since <= self.idle_seconds and _quiet(conn):
                REUSED_TOTAL.inc()
                return conn
            conn.close()

    def put(self, key: PoolKey, conn: C) -> None:
        """Keep ``conn`` for a later request to ``key`` (closing what the bounds push out)."""
        closing: list[C] = []
        with self._lock:
            numbers = self._per_key.setdefault(key, [])
            if len(numbers) >= self.max_per_key:
                closing.append(self._idle.pop((key, numbers.pop(0)))[0])
            while len(self._idle) >= self.max_idle:
                (old_key, old_number), (old, _) = self._idle.popitem(last=False)
                self._per_key[old_key].remove(old_number)
                if not self._per_key[old_key] and old_key != key:
                    del self._per_key[old_key]
                closing.append(old)
            self._sequence += 1
            numbers.append(self._sequence)
            self._idle[(key, self._sequence)] = (conn, self._clock())
        for old in closing:
            old.close()


def _quiet(conn: PooledConnection) -> bool:
    """True when nothing is waiting on ``conn``: no end of stream, no byte the server sent unasked."""
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return False
    if readable:
        return False
    conn.raw.no_wait = True  # the reader's own buffer (or TLS's) must be empty too
    try:
        return not conn.reader.peek(1)
    except (OutboundError, OSError, ValueError):
        return False
    finally:
        conn.raw.no_wait = False
