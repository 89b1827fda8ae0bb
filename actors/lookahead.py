"""Look-ups started ahead of a host's stream: DIDs not yet in memory are resolved while earlier frames wait.

A host's events are verified one after the other, so an account seen for the first time
(an identity fetch from the PLC directory, an account row from SQL) holds up every event
of that host behind it: after a restart, or when a host creates many accounts, a host's
stream goes at one directory round trip per new account. When a subscriber meets a DID that
is not in memory it reads on the frames its connection has already buffered (never waiting
for more) and hands their DIDs here; each miss is looked up in a background greenlet, so the
stream waits for one round trip per burst instead of one per account.

Bounded: at most ``max_in_flight`` look-ups at once (more are skipped: the subscriber looks
them up itself, as without look-ahead), and at most ``max_bytes`` of read-ahead frames held
by every subscriber of the process together. A look-up ahead changes nothing a look-up in
order would not: it fills the same caches with the same answers (failures included, which
the identity directory remembers briefly), and verification still happens in stream order.
"""

from __future__ import annotations

from typing import Any, Protocol

import gevent
from prometheus_client import Counter

from store.db import TRANSIENT_DB_ERRORS

LOOKUPS = Counter("skyrelay_lookahead_lookups_total", "DIDs looked up ahead of their host's stream", ["result"])


class _Identities(Protocol):
    def peek(self, did: str) -> Any: ...
    def resolve(self, did: str) -> Any: ...


class _Accounts(Protocol):
    def cached(self, did: str) -> bool: ...
    def get(self, did: str) -> Any: ...


class LookAhead:
    def __init__(
        self,
        identities: _Identities,
        accounts: _Accounts,
        *,
        max_in_flight: int = 64,
        max_bytes: int = 64 * 1024 * 1024,
        frames_per_host: int = 256,
        bytes_per_host: int = 1024 * 1024,
    ) -> None:
        self.identities = identities
        self.accounts = accounts
        self.max_in_flight = max_in_flight
        self.max_bytes = max_bytes
        self.frames_per_host = frames_per_host
        self.bytes_per_host = bytes_per_host
        self.in_flight = 0
        self.held_bytes = 0  # read-ahead frames held by subscribers (they give them back as they go)
        self._wanted: set[str] = set()

    def missing(self, did: str) -> bool:
        """True when verifying ``did`` now would wait for a look-up (no I/O)."""
        return self.identities.peek(did) is None or not self.accounts.cached(did)

    def room(self, host_bytes: int, host_frames: int) -> bool:
        return (
            host_frames < self.frames_per_host and host_bytes < self.bytes_per_host and self.held_bytes < self.max_bytes
        )

    def hold(self, size: int) -> None:
        self.held_bytes += size

    def release(self, size: int) -> None:
        self.held_bytes -= size

    def offer(self, did: str) -> None:
        """Look ``did`` up in the background if it is missing; never blocks."""
        if did in self._wanted or not self.missing(did):
            return
        if self.in_flight >= self.max_in_flight:
            LOOKUPS.labels("skipped").inc()
            return
        self.in_flight += 1
        self._wanted.add(did)
        gevent.spawn(self._look_up, did)

    def _look_up(self, did: str) -> None:
        result = "done"
        try:
            try:
                self.identities.resolve(did)
            except Exception:  # an identity error: remembered by the directory, met again in order
                result = "identity_failed"
            try:
                self.accounts.get(did)
            except TRANSIENT_DB_ERRORS:  # the subscriber meets the database trouble itself, in order
                result = "account_failed"
        finally:
            self.in_flight -= 1
            self._wanted.discard(did)
            LOOKUPS.labels(result).inc()
