"""One timer for every connected upstream of a process: pings and idle-cursor saves without a greenlet per host.

A ``Heartbeat`` keeps the set of connected subscribers (``Beating`` members). One greenlet
wakes every ``interval`` (the shortest any member asked for) and calls ``beat(now)`` on each;
a member does its own due work there (tell the sequencer an idle cursor, start a ping) and
must not block: a ping that could wait on a full socket runs in its own short-lived greenlet.
The greenlet starts with the first member and ends when the last one leaves, so a process
with no connected host has no timer. Before, each connected host had its own pinger greenlet
waking every few seconds: 3,000 idle hosts cost 3,000 sleeping greenlets and their stacks.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import gevent

log = logging.getLogger(__name__)


class Beating(Protocol):
    def beat(self, now: float) -> None: ...


class Heartbeat:
    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._members: dict[Beating, None] = {}  # insertion order: beats go round in a stable order
        self._greenlet: gevent.Greenlet | None = None

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: Beating, interval: float | None = None) -> None:
        """Beat ``member`` from now on, at least every ``interval`` seconds when given."""
        if interval is not None and 0 < interval < self.interval:
            self.interval = interval
        self._members[member] = None
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def discard(self, member: Beating) -> None:
        self._members.pop(member, None)

    def _run(self) -> None:
        try:
            while self._members:
                gevent.sleep(self.interval)
                now = time.monotonic()
                for member in list(self._members):
                    if member not in self._members:
                        continue  # left during this round
                    try:
                        member.beat(now)
                    except Exception:  # a bug in one member must not stop the others' heartbeat
                        log.exception("heartbeat member failed member=%r", member)
        finally:
            self._greenlet = None
