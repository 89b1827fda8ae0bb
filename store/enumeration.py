"""Named queries for host enumeration: the listRepos cursor and progress per host, accounts it finds.

A host's row in ``host_enumeration`` holds where its ``listRepos`` walk stands; a page's
accounts and the cursor after it are written in one transaction, so a restart resumes at the
first page not yet stored. ``state`` is ``running`` (not finished, or to retry), ``done`` or
``stopped`` (given up for a reason in ``error``: not retried by itself).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import peewee

from store.accounts import ACTIVE
from store.sql import execute, executemany, fetchall, fetchone

ENUM_RUNNING = "running"
ENUM_DONE = "done"
ENUM_STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class EnumerationRow:
    host_id: int
    cursor: str | None
    state: str
    accounts: int
    pages: int
    error: str | None
    updated_at: float


_COLUMNS = "host_id, cursor, state, accounts, pages, error, updated_at"


def get_enumeration(db: peewee.Database, host_id: int) -> EnumerationRow | None:
    r = fetchone(db, f"SELECT {_COLUMNS} FROM host_enumeration WHERE host_id = ?", (host_id,))
    return EnumerationRow(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), r[5], float(r[6])) if r else None


def all_enumerations(db: peewee.Database) -> dict[int, EnumerationRow]:
    rows = fetchall(db, f"SELECT {_COLUMNS} FROM host_enumeration")
    return {int(r[0]): EnumerationRow(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), r[5], float(r[6])) for r in rows}


def start_enumeration(db: peewee.Database, host_id: int) -> EnumerationRow:
    """The host's progress row, created (no cursor, running) if it has none."""
    execute(
        db,
        "INSERT INTO host_enumeration (host_id, state, updated_at) VALUES (?, ?, ?) ON CONFLICT (host_id) DO NOTHING",
        (host_id, ENUM_RUNNING, time.time()),
    )
    row = get_enumeration(db, host_id)
    assert row is not None
    return row


def known_dids(db: peewee.Database, dids: Sequence[str]) -> set[str]:
    """Which of ``dids`` have an account row (asked 500 at a time: old SQLite allows 999 parameters)."""
    found: set[str] = set()
    for start in range(0, len(dids), 500):
        part = tuple(dids[start : start + 500])
        marks = ", ".join("?" for _ in part)
        found.update(str(r[0]) for r in fetchall(db, f"SELECT did FROM account WHERE did IN ({marks})", part))
    return found


def save_page(
    db: peewee.Database, host_id: int, accounts: Sequence[tuple[str, str]], cursor: str | None, *, found: int
) -> None:
    """Insert the page's new accounts ``(did, upstream status)`` and move the host's cursor past the page.

    An account already known keeps its row untouched (its host, status and rev stay as they are).
    """
    now = time.time()
    with db.atomic():
        executemany(
            db,
            "INSERT INTO account (did, host_id, status, upstream_status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (did) DO NOTHING",
            # in DID order, as every multi-row account writer: one lock order, no deadlock on PostgreSQL
            [(did, host_id, ACTIVE, status, now, now) for did, status in sorted(accounts, key=lambda a: a[0])],
        )
        execute(
            db,
            "UPDATE host_enumeration SET cursor = ?, accounts = accounts + ?, pages = pages + 1, updated_at = ?"
            " WHERE host_id = ?",
            (cursor, found, now, host_id),
        )


def finish_enumeration(db: peewee.Database, host_id: int, state: str, error: str | None = None) -> None:
    execute(db, "UPDATE host_enumeration SET state = ?, error = ?, updated_at = ? WHERE host_id = ?",
            (state, error, time.time(), host_id))  # fmt: skip


def restart_enumeration(db: peewee.Database, host_id: int) -> None:
    """Walk the host's listRepos again from the start (an operator's resync)."""
    execute(db, "UPDATE host_enumeration SET cursor = NULL, state = ?, error = NULL, accounts = 0, pages = 0,"
            " updated_at = ? WHERE host_id = ?", (ENUM_RUNNING, time.time(), host_id))  # fmt: skip
