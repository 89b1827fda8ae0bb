"""Cache misses read from SQL in batches: look-ups of many keys gathered into one ``IN`` query.

Verification greenlets of many hosts miss the account and identity caches at once (a run full
of accounts the relay knows but has not seen lately). ``BatchLookup.get`` parks the caller on
a slot for its key; one drainer greenlet waits one turn of the event loop (plus
``gather_seconds``) for more keys, then reads up to ``max_batch`` of them with one query, and
again with whatever arrived while that query was in flight, until none is waiting: batches
grow with the load. A key already waiting or in flight shares its slot. A failed
query fails every waiter of that batch with the same error (each caller retries on its own).

Where the query runs: SQLite in gevent's thread pool on that pool thread's own connection,
left open for the next batch (no connect and pragmas per look-up); PostgreSQL in the drainer
greenlet (store.db's wait callback makes it cooperative) on a pooled connection. The slots are gevent
objects touched only by greenlets: the pool thread runs the query and nothing else (no gevent
lock is shared with the thread pool, see HACKING). Without gevent's monkey-patching (tests
calling from plain threads, scripts) each ``get`` reads its key inline, as one query.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

import gevent
import peewee
from gevent import monkey
from gevent.event import AsyncResult

from actors.blocking import off_loop
from store.db import is_postgres
from store.sql import MAX_IN_KEYS

V = TypeVar("V")
Query = Callable[[peewee.Database, Sequence[str]], Mapping[str, V]]

# how long the first miss of a batch waits for others beyond one turn of the event loop: 0,
# the query in flight is the gather window (a 1 ms wait made 8 concurrent misses 5x slower:
# scripts/bench_account_lookup.py --gather-ms 1)
GATHER_SECONDS = 0.0


def _borrowed(db: peewee.Database, query: Query[V], keys: Sequence[str]) -> Mapping[str, V]:
    """``query`` on the calling thread's connection, opened for it and closed after if it had none."""
    opened = db.is_closed()
    if opened:
        db.connect()
    try:
        return query(db, keys)
    finally:
        if opened:
            db.close()


def _kept_open(db: peewee.Database, query: Query[V], keys: Sequence[str]) -> Mapping[str, V]:
    """``query`` on this (thread-pool) thread's own connection, opened once and left open."""
    if db.is_closed():
        db.connect(reuse_if_open=True)
    return query(db, keys)


class BatchLookup(Generic[V]):
    """``get(key)``: the value ``query`` returns for ``key`` (``None`` when absent), read in batches."""

    def __init__(
        self,
        db: peewee.Database,
        query: Query[V],
        *,
        max_batch: int = MAX_IN_KEYS,
        gather_seconds: float | None = None,  # None: GATHER_SECONDS
        batching: bool | None = None,  # None: batch when gevent has patched threading
    ) -> None:
        self._db = db
        self._query = query
        self._max_batch = max(1, max_batch)
        self._gather = GATHER_SECONDS if gather_seconds is None else gather_seconds
        self._batching = monkey.is_module_patched("threading") if batching is None else batching
        self._waiting: dict[str, AsyncResult] = {}
        self._inflight: dict[str, AsyncResult] = {}
        self._drainer: gevent.Greenlet | None = None
        self.queries = 0  # SQL round trips made (for benchmarks and tests)

    def get(self, key: str) -> V | None:
        """The value of ``key``; raises what the batch's query raised."""
        if not self._batching:
            self.queries += 1
            return _borrowed(self._db, self._query, [key]).get(key)
        slot = self._inflight.get(key) or self._waiting.get(key)
        if slot is None:
            slot = self._waiting[key] = AsyncResult()
            if self._drainer is None:
                self._drainer = gevent.spawn(self._drain)
        return slot.get()

    def _run(self, keys: Sequence[str]) -> Mapping[str, V]:
        self.queries += 1
        if is_postgres(self._db) or not monkey.is_module_patched("threading"):
            return _borrowed(self._db, self._query, keys)
        return off_loop(lambda: _kept_open(self._db, self._query, keys))

    def _drain(self) -> None:
        try:
            gevent.sleep(self._gather)
            while self._waiting:
                keys = list(self._waiting)[: self._max_batch]
                batch = {key: self._waiting.pop(key) for key in keys}
                self._inflight.update(batch)
                try:
                    found = self._run(keys)
                except BaseException as exc:  # every waiter gets the error; a kill is passed on
                    for slot in batch.values():
                        slot.set_exception(exc if isinstance(exc, Exception) else RuntimeError("lookup interrupted"))
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for key, slot in batch.items():
                        slot.set(found.get(key))
                finally:
                    for key in keys:
                        self._inflight.pop(key, None)
        finally:
            self._drainer = None
            if self._waiting:  # killed with keys waiting: another drainer serves them
                self._drainer = gevent.spawn(self._drain)
