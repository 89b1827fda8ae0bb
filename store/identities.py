"""Named queries of the ``identity`` table: load resolved DIDs (one or many), upsert or delete in batches.

Each function borrows a connection when the calling thread (greenlet) has none open and gives
it back afterwards, so short-lived verification greenlets do not leak pooled connections.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import peewee

from store.db import is_postgres
from store.sql import fetch_in, insert_many

# Rows per INSERT: 6 parameters each stays under SQLite's historical 999-variable limit.
_UPSERT_BATCH_ROWS = 150
_DELETE_BATCH_ROWS = 500

_COLUMNS = "did, handle, signing_key, pds_endpoint, doc, fetched_at"


@dataclass(frozen=True, slots=True)
class IdentityRow:
    """One row of ``identity``: the parsed fields, the document JSON and its fetch time (unix s)."""

    did: str
    handle: str | None
    signing_key: str | None
    pds_endpoint: str | None
    doc: str
    fetched_at: float


@contextmanager
def _connected(db: peewee.Database) -> Iterator[None]:
    opened = db.is_closed()
    if opened:
        db.connect()
    try:
        yield
    finally:
        if opened:
            db.close()


def _param(db: peewee.Database) -> str:
    return "%s" if is_postgres(db) else "?"


def load_identity(db: peewee.Database, did: str) -> IdentityRow | None:
    """The stored row of ``did``, or ``None``."""
    return load_identities(db, [did]).get(did)


def load_identities(db: peewee.Database, dids: Sequence[str]) -> dict[str, IdentityRow]:
    """The stored rows of ``dids`` by DID (absent ones left out), in queries of at most ``MAX_IN_KEYS``."""
    with _connected(db):
        rows = fetch_in(db, f"SELECT {_COLUMNS} FROM identity WHERE did IN ({{}})", dids)
    return {r[0]: IdentityRow(r[0], r[1], r[2], r[3], r[4], float(r[5])) for r in rows}


def save_identities(db: peewee.Database, rows: Iterable[IdentityRow]) -> int:
    """Insert or update ``rows`` in one transaction; return how many distinct DIDs were written.

    A row never replaces a stored one with a newer ``fetched_at`` (a late write of an older
    fetch loses). Of several rows for one DID, the last given wins.
    """
    latest = {row.did: row for row in rows}
    if not latest:
        return 0
    p = _param(db)
    batch = list(latest.values())
    with _connected(db), db.atomic():
        for start in range(0, len(batch), _UPSERT_BATCH_ROWS):
            chunk = batch[start : start + _UPSERT_BATCH_ROWS]
            values = ", ".join(f"({p}, {p}, {p}, {p}, {p}, {p})" for _ in chunk)
            params: list[object] = []
            for r in chunk:
                params.extend((r.did, r.handle, r.signing_key, r.pds_endpoint, r.doc, r.fetched_at))
            db.execute_sql(
                f"INSERT INTO identity ({_COLUMNS}) VALUES {values} "
                "ON CONFLICT (did) DO UPDATE SET handle = excluded.handle, signing_key = excluded.signing_key, "
                "pds_endpoint = excluded.pds_endpoint, doc = excluded.doc, fetched_at = excluded.fetched_at "
                "WHERE excluded.fetched_at >= identity.fetched_at",
                params,
            )
    return len(batch)


def insert_identities(db: peewee.Database, rows: Iterable[IdentityRow]) -> int:
    """Bulk-load identities not stored yet (stored DIDs are left as they are); for seeding benchmarks."""
    with _connected(db):
        return insert_many(
            db,
            f"INSERT INTO identity ({_COLUMNS})",
            [(r.did, r.handle, r.signing_key, r.pds_endpoint, r.doc, r.fetched_at) for r in rows],
            "ON CONFLICT (did) DO NOTHING",
        )


def delete_identities(db: peewee.Database, dids: Iterable[str]) -> int:
    """Delete the rows of ``dids`` (absent ones are ignored); return how many DIDs were given."""
    unique = list(dict.fromkeys(dids))
    if not unique:
        return 0
    p = _param(db)
    with _connected(db), db.atomic():
        for start in range(0, len(unique), _DELETE_BATCH_ROWS):
            chunk = unique[start : start + _DELETE_BATCH_ROWS]
            db.execute_sql(f"DELETE FROM identity WHERE did IN ({', '.join([p] * len(chunk))})", chunk)
    return len(unique)
