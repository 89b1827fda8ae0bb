"""In-memory account state for verification: a bounded LRU over the SQL ``account`` table.

The ingest path reads and updates it inline (one greenlet per host, no preemption). What is
persisted is decided elsewhere: the sequencer writes the state carried by each durable event.
Misses are read in batches (``actors.batch_lookup``: the misses of every host gathered into
one query). A failing SQL read (the database restarting) is retried with backoff, holding that host's
events: a subscriber that crashed instead would resume from the cursor in SQL, which lags
behind the log while the database is away.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import peewee

from actors.backoff import RetryPolicy, retry
from actors.batch_lookup import BatchLookup
from store.accounts import ACTIVE, AccountRow, load_accounts
from store.db import TRANSIENT_DB_ERRORS


@dataclass(frozen=True, slots=True)
class AccountState:
    """What the relay knows of one account; replaced (never mutated) on every change."""

    did: str
    host_id: int | None
    status: str = ACTIVE  # relay-level (admin takedown)
    upstream_status: str = ACTIVE  # from the PDS's #account events
    rev: str | None = None
    commit_cid: bytes | None = None
    data_cid: bytes | None = None
    needs_resync: bool = False

    @property
    def active(self) -> bool:
        return self.status == ACTIVE and self.upstream_status == ACTIVE

    def to_row(self) -> AccountRow:
        return AccountRow(
            self.did, self.host_id, self.status, self.upstream_status, self.rev,
            self.commit_cid, self.data_cid, self.needs_resync,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: AccountRow) -> AccountState:
        return cls(
            row.did, row.host_id, row.status, row.upstream_status, row.rev,
            row.commit_cid, row.data_cid, row.needs_resync,
        )  # fmt: skip

    def updated(self, **changes: object) -> AccountState:
        return replace(self, **changes)  # type: ignore[arg-type]


# accounts kept in memory: 563 bytes each (scripts/bench_account_lookup.py), ~110 MB per
# process at the bound: twice the 100,000 accounts active in a busy run (misses read in batches)
DEFAULT_MAX_ENTRIES = 200_000


class AccountCache:
    """``did -> AccountState``: memory first, then SQL; at most ``max_entries`` in memory."""

    def __init__(
        self,
        db: peewee.Database,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        retry_policy: RetryPolicy | None = None,
        *,
        batching: bool | None = None,  # None: batch misses under gevent (actors.batch_lookup)
    ) -> None:
        self._db = db
        self._lookup = BatchLookup(db, load_accounts, batching=batching)
        self._retry_policy = retry_policy or RetryPolicy()
        self._max = max_entries
        self._items: OrderedDict[str, AccountState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, did: str) -> AccountState | None:
        state = self._items.get(did)
        if state is not None:
            self._items.move_to_end(did)
            self.hits += 1
            return state
        self.misses += 1
        row = retry(
            lambda: self._lookup.get(did), operation="account_lookup", retry_on=TRANSIENT_DB_ERRORS,
            policy=self._retry_policy,
        )  # fmt: skip
        state = self._items.get(did)  # put while the batch was read: newer than SQL
        if state is not None:
            self._items.move_to_end(did)
            return state
        if row is None:
            return None
        state = AccountState.from_row(row)
        self.put(state)
        return state

    def cached(self, did: str) -> bool:
        """True when ``get(did)`` would answer from memory (no I/O, no LRU move)."""
        return did in self._items

    def put(self, state: AccountState) -> None:
        self._items[state.did] = state
        self._items.move_to_end(state.did)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def forget(self, did: str) -> None:
        self._items.pop(did, None)

    def __len__(self) -> int:
        return len(self._items)
