"""Named queries for accounts: load one or many, list them, upsert many (write-behind from memory), relay status."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import peewee

from store.sql import execute, executemany, fetch_in, fetchall, fetchone, insert_many, to_bytes

# the status of an active account, at the relay (moderation) and upstream (#account)
ACTIVE = "active"
# relay-level status of an account an operator took down
TAKENDOWN = "takendown"
# relay-level status of an account past its host's account limit: its events are dropped until released
THROTTLED = "throttled"


@dataclass(frozen=True, slots=True)
class AccountRow:
    did: str
    host_id: int | None
    status: str  # relay-level: active, takendown or throttled
    upstream_status: str  # from the PDS's #account events
    rev: str | None
    commit_cid: bytes | None
    data_cid: bytes | None
    needs_resync: bool

    @property
    def active(self) -> bool:
        return self.status == ACTIVE and self.upstream_status == ACTIVE


_COLUMNS = "did, host_id, status, upstream_status, rev, commit_cid, data_cid, needs_resync"


def _row(r: tuple[Any, ...]) -> AccountRow:
    return AccountRow(r[0], r[1], r[2], r[3], r[4], to_bytes(r[5]), to_bytes(r[6]), bool(r[7]))


def _by_did(row: AccountRow) -> str:
    return row.did


def load_account(db: peewee.Database, did: str) -> AccountRow | None:
    r = fetchone(db, f"SELECT {_COLUMNS} FROM account WHERE did = ?", (did,))
    return _row(r) if r else None


def load_accounts(db: peewee.Database, dids: Sequence[str]) -> dict[str, AccountRow]:
    """The stored rows of ``dids`` by DID (unknown ones absent), in queries of at most ``MAX_IN_KEYS``."""
    return {r[0]: _row(r) for r in fetch_in(db, f"SELECT {_COLUMNS} FROM account WHERE did IN ({{}})", dids)}


def list_accounts(db: peewee.Database, *, after_did: str = "", limit: int = 500) -> list[AccountRow]:
    rows = fetchall(db, f"SELECT {_COLUMNS} FROM account WHERE did > ? ORDER BY did LIMIT ?", (after_did, limit))
    return [_row(r) for r in rows]


def upsert_accounts(db: peewee.Database, rows: Iterable[AccountRow]) -> None:
    """Insert or update many accounts in one batched statement (caller holds the transaction).

    Rows are written in DID order: two transactions upserting overlapping accounts (the
    write-behind and a status write-through) then lock them in the same order and cannot
    deadlock on PostgreSQL.
    """
    now = time.time()
    executemany(
        db,
        "INSERT INTO account (did, host_id, status, upstream_status, rev, commit_cid, data_cid, needs_resync,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (did) DO UPDATE SET host_id = excluded.host_id, status = excluded.status,"
        " upstream_status = excluded.upstream_status, rev = excluded.rev, commit_cid = excluded.commit_cid,"
        " data_cid = excluded.data_cid, needs_resync = excluded.needs_resync, updated_at = excluded.updated_at",
        [
            (r.did, r.host_id, r.status, r.upstream_status, r.rev, r.commit_cid, r.data_cid, r.needs_resync, now, now)
            for r in sorted(rows, key=_by_did)  # one lock order for every writer: no deadlock on PostgreSQL
        ],
    )


def insert_accounts(db: peewee.Database, rows: Iterable[AccountRow]) -> int:
    """Bulk-load accounts not known yet (known DIDs are left as they are); for seeding benchmarks and imports."""
    now = time.time()
    return insert_many(
        db,
        "INSERT INTO account (did, host_id, status, upstream_status, rev, commit_cid, data_cid, needs_resync,"
        " created_at, updated_at)",
        [(r.did, r.host_id, r.status, r.upstream_status, r.rev, r.commit_cid, r.data_cid, r.needs_resync, now, now)
         for r in sorted(rows, key=_by_did)],
        "ON CONFLICT (did) DO NOTHING",
    )  # fmt: skip


def set_account_status(db: peewee.Database, did: str, status: str) -> bool:
    """Set the relay-level status of a known account; False when the account is unknown."""
    return execute(db, "UPDATE account SET status = ?, updated_at = ? WHERE did = ?", (status, time.time(), did)) > 0


def list_takedowns(db: peewee.Database, *, after_uid: int = 0, limit: int = 500) -> list[tuple[int, str]]:
    """``(uid, did)`` of accounts taken down at this relay, by uid."""
    rows = fetchall(db, "SELECT uid, did FROM account WHERE status = ? AND uid > ? ORDER BY uid LIMIT ?",
                    (TAKENDOWN, after_uid, limit))  # fmt: skip
    return [(int(r[0]), str(r[1])) for r in rows]


def takendown_dids(db: peewee.Database) -> set[str]:
    return {str(r[0]) for r in fetchall(db, "SELECT did FROM account WHERE status = ?", (TAKENDOWN,))}


def host_account_dids(db: peewee.Database, host_id: int, *, after_did: str = "", limit: int = 1000) -> list[str]:
    rows = fetchall(db, "SELECT did FROM account WHERE host_id = ? AND did > ? ORDER BY did LIMIT ?",
                    (host_id, after_did, limit))  # fmt: skip
    return [str(r[0]) for r in rows]


def throttled_dids(db: peewee.Database) -> set[str]:
    return {str(r[0]) for r in fetchall(db, "SELECT did FROM account WHERE status = ?", (THROTTLED,))}


def host_throttled_dids(db: peewee.Database, host_id: int, *, limit: int) -> list[str]:
    """Up to ``limit`` throttled accounts of a host, oldest first (the order they are released in)."""
    rows = fetchall(db, "SELECT did FROM account WHERE host_id = ? AND status = ? ORDER BY uid LIMIT ?",
                    (host_id, THROTTLED, limit))  # fmt: skip
    return [str(r[0]) for r in rows]


def throttled_counts(db: peewee.Database) -> dict[int, int]:
    """Throttled accounts per host id (hosts without any are absent)."""
    rows = fetchall(db, "SELECT host_id, COUNT(*) FROM account WHERE status = ? AND host_id IS NOT NULL"
                        " GROUP BY host_id", (THROTTLED,))  # fmt: skip
    return {int(r[0]): int(r[1]) for r in rows}


def host_unthrottled_count(db: peewee.Database, host_id: int) -> int:
    """The host's accounts that count against its limit as admitted ones (all but the throttled)."""
    r = fetchone(db, "SELECT COUNT(*) FROM account WHERE host_id = ? AND status <> ?", (host_id, THROTTLED))
    return int(r[0]) if r else 0
