"""Named queries for upstream hosts: create, list, cursors, status, limits, trust, domain bans, relay state."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import peewee

from store.sql import execute, executemany, fetchall, fetchone

HOST_ACTIVE = "active"
HOST_OFFLINE = "offline"  # kept failing; retried on a slow schedule
HOST_BANNED = "banned"


@dataclass(frozen=True, slots=True)
class HostRow:
    id: int
    hostname: str
    status: str
    last_seq: int
    account_limit: int | None
    events_per_second: float | None
    account_count: int
    lenient: bool
    trusted: bool
    last_error: str | None
    events_per_hour: int | None = None  # the host's own hour and day limits (None: the scaled defaults)
    events_per_day: int | None = None


_COLUMNS = (
    "id, hostname, status, last_seq, account_limit, events_per_second, account_count, lenient, trusted, last_error,"
    " events_per_hour, events_per_day"
)


def _row(r: tuple[Any, ...]) -> HostRow:
    return HostRow(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], int(r[6]), bool(r[7]), bool(r[8]), r[9],
                   None if r[10] is None else int(r[10]), None if r[11] is None else int(r[11]))  # fmt: skip


def get_host(db: peewee.Database, hostname: str) -> HostRow | None:
    r = fetchone(db, f"SELECT {_COLUMNS} FROM host WHERE hostname = ?", (hostname,))
    return _row(r) if r else None


def get_host_by_id(db: peewee.Database, host_id: int) -> HostRow | None:
    r = fetchone(db, f"SELECT {_COLUMNS} FROM host WHERE id = ?", (host_id,))
    return _row(r) if r else None


def ensure_host(db: peewee.Database, hostname: str, *, account_limit: int | None = None) -> HostRow:
    """The host row for ``hostname``, created (status active, no cursor) if it is new."""
    existing = get_host(db, hostname)
    if existing:
        return existing
    now = time.time()
    with db.atomic():
        execute(
            db,
            "INSERT INTO host (hostname, status, last_seq, account_limit, created_at, updated_at)"
            " VALUES (?, ?, -1, ?, ?, ?) ON CONFLICT (hostname) DO NOTHING",
            (hostname, HOST_ACTIVE, account_limit, now, now),
        )
    row = get_host(db, hostname)
    assert row is not None
    return row


def count_hosts(db: peewee.Database) -> int:
    """Hosts the relay knows and does not ban (what the ``max_hosts`` cap counts)."""
    row = fetchone(db, "SELECT COUNT(*) FROM host WHERE status <> ?", (HOST_BANNED,))
    return int(row[0]) if row else 0


def list_hosts(db: peewee.Database, *, after_id: int = 0, limit: int = 1000) -> list[HostRow]:
    rows = fetchall(db, f"SELECT {_COLUMNS} FROM host WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
    return [_row(r) for r in rows]


def save_cursors(db: peewee.Database, cursors: Iterable[tuple[int, int]]) -> None:
    """Persist upstream cursors: (host_id, last upstream seq processed); never moves backwards."""
    now = time.time()
    executemany(
        db,
        "UPDATE host SET last_seq = ?, updated_at = ? WHERE id = ? AND last_seq < ?",
        [(seq, now, host_id, seq) for host_id, seq in cursors],
    )


def reset_cursors(db: peewee.Database, host_ids: Iterable[int]) -> None:
    """Forget saved cursors (the host's history restarted); ``save_cursors`` then sets the new one."""
    executemany(db, "UPDATE host SET last_seq = -1, updated_at = ? WHERE id = ?", [(time.time(), h) for h in host_ids])


def count_host_accounts(db: peewee.Database, host_id: int) -> int:
    row = fetchone(db, "SELECT COUNT(*) FROM account WHERE host_id = ?", (host_id,))
    return int(row[0]) if row else 0


def refresh_account_counts(db: peewee.Database, host_ids: Iterable[int]) -> None:
    """Recount ``account_count`` of these hosts from the accounts table (an index range count each)."""
    ids = sorted(set(host_ids))
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        execute(
            db,
            "UPDATE host SET account_count = (SELECT COUNT(*) FROM account WHERE account.host_id = host.id)"
            f" WHERE id IN ({marks})",
            chunk,
        )


def set_host_status(db: peewee.Database, host_id: int, status: str, error: str | None = None) -> None:
    execute(db, "UPDATE host SET status = ?, last_error = ?, updated_at = ? WHERE id = ?",
            (status, error, time.time(), host_id))  # fmt: skip


def save_account_counts(db: peewee.Database, counts: Iterable[tuple[int, int]]) -> None:
    executemany(db, "UPDATE host SET account_count = ? WHERE id = ?", [(n, h) for h, n in counts])


def banned_domains(db: peewee.Database) -> list[str]:
    return [r[0] for r in fetchall(db, "SELECT domain FROM domain_ban ORDER BY domain")]


def add_domain_ban(db: peewee.Database, domain: str) -> None:
    execute(db, "INSERT INTO domain_ban (domain, created_at) VALUES (?, ?) ON CONFLICT (domain) DO NOTHING",
            (domain.lower(), time.time()))  # fmt: skip


def remove_domain_ban(db: peewee.Database, domain: str) -> bool:
    """Lift a ban; False when ``domain`` was not banned."""
    return execute(db, "DELETE FROM domain_ban WHERE domain = ?", (domain.lower(),)) > 0


def set_host_limits(
    db: peewee.Database, host_id: int, *, account_limit: int | None, events_per_second: float | None,
    events_per_hour: int | None = None, events_per_day: int | None = None,
) -> None:  # fmt: skip
    execute(db, "UPDATE host SET account_limit = ?, events_per_second = ?, events_per_hour = ?, events_per_day = ?,"
                " updated_at = ? WHERE id = ?",
            (account_limit, events_per_second, events_per_hour, events_per_day, time.time(), host_id))  # fmt: skip


def set_hosts_trusted(db: peewee.Database, trusted: Iterable[int]) -> None:
    """Mark exactly the hosts ``trusted`` as trusted (every other host untrusted)."""
    ids = list(trusted)
    with db.atomic():
        execute(db, "UPDATE host SET trusted = ? WHERE trusted = ?", (False, True))
        executemany(db, "UPDATE host SET trusted = ? WHERE id = ?", [(True, h) for h in ids])


def count_hosts_created_since(db: peewee.Database, since: float) -> int:
    row = fetchone(db, "SELECT COUNT(*) FROM host WHERE created_at >= ?", (since,))
    return int(row[0]) if row else 0


def get_state(db: peewee.Database, key: str) -> str | None:
    r = fetchone(db, "SELECT value FROM relay_state WHERE key = ?", (key,))
    return r[0] if r else None


def set_state(db: peewee.Database, key: str, value: str) -> None:
    execute(
        db,
        "INSERT INTO relay_state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def hosts_at_account_limit(db: peewee.Database, default_limit: int) -> int:
    """Hosts whose accounts (throttled ones included) reach their limit (``default_limit`` where unset)."""
    r = fetchone(db, "SELECT COUNT(*) FROM host WHERE account_count >= COALESCE(account_limit, ?)", (default_limit,))
    return int(r[0]) if r else 0
