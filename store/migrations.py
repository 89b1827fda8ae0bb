"""Versioned schema migrations, applied in order at start-up, each in its own transaction.

Migrations are portable DDL with placeholders (``{pk}``, ``{blob}``...) filled per dialect, so
one list serves SQLite and PostgreSQL. A migration, once released, never changes: add a new one.
A database whose recorded version is newer than this code knows is refused.

Each migration list records its versions in a table of its own (the relay's in
``schema_version``, the carstore's in ``carstore_schema_version``), so one database can hold
both schemas. Before that split every list used ``schema_version``: a list whose own table is
still empty adopts its rows from there (same version, same name), once, so an existing
separate carstore database keeps its history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import peewee

from store.db import StoreError, is_postgres

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


_SQLITE_TYPES = {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "float": "REAL"}
_PG_TYPES = {"pk": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA", "float": "DOUBLE PRECISION"}

MAIN_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "hosts, accounts, identities, bans, event log segments, relay state",
        (
            """CREATE TABLE host (
                id {pk},
                hostname TEXT NOT NULL UNIQUE,
                status TEXT NOT NULL DEFAULT 'active',
                last_seq BIGINT NOT NULL DEFAULT -1,
                account_limit BIGINT,
                events_per_second {float},
                account_count BIGINT NOT NULL DEFAULT 0,
                lenient BOOLEAN NOT NULL DEFAULT FALSE,
                trusted BOOLEAN NOT NULL DEFAULT FALSE,
                last_error TEXT,
                created_at {float} NOT NULL,
                updated_at {float} NOT NULL
            )""",
            """CREATE TABLE account (
                uid {pk},
                did TEXT NOT NULL UNIQUE,
                host_id BIGINT REFERENCES host (id),
                status TEXT NOT NULL DEFAULT 'active',
                upstream_status TEXT NOT NULL DEFAULT 'active',
                rev TEXT,
                commit_cid {blob},
                data_cid {blob},
                needs_resync BOOLEAN NOT NULL DEFAULT FALSE,
                created_at {float} NOT NULL,
                updated_at {float} NOT NULL
            )""",
            "CREATE INDEX account_host_idx ON account (host_id)",
            """CREATE TABLE identity (
                did TEXT PRIMARY KEY,
                handle TEXT,
                signing_key TEXT,
                pds_endpoint TEXT,
                doc TEXT NOT NULL,
                fetched_at {float} NOT NULL
            )""",
            """CREATE TABLE domain_ban (
                id {pk},
                domain TEXT NOT NULL UNIQUE,
                created_at {float} NOT NULL
            )""",
            """CREATE TABLE log_segment (
                id {pk},
                path TEXT NOT NULL UNIQUE,
                first_seq BIGINT NOT NULL,
                last_seq BIGINT NOT NULL,
                first_time {float} NOT NULL,
                last_time {float} NOT NULL,
                byte_size BIGINT NOT NULL DEFAULT 0,
                sealed BOOLEAN NOT NULL DEFAULT FALSE
            )""",
            "CREATE INDEX log_segment_first_seq_idx ON log_segment (first_seq)",
            """CREATE TABLE relay_state (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "index of accounts by relay status (takedown lists)",
        ("CREATE INDEX account_status_idx ON account (status)",),
    ),
    Migration(
        3,
        "host enumeration progress (listRepos cursor per host)",
        (
            """CREATE TABLE host_enumeration (
                host_id BIGINT PRIMARY KEY REFERENCES host (id),
                cursor TEXT,
                state TEXT NOT NULL DEFAULT 'running',
                accounts BIGINT NOT NULL DEFAULT 0,
                pages BIGINT NOT NULL DEFAULT 0,
                error TEXT,
                updated_at {float} NOT NULL
            )""",
        ),
    ),
    Migration(
        4,
        "DID list import jobs and the accounts each imported",
        (
            """CREATE TABLE import_job (
                id {pk},
                name TEXT NOT NULL UNIQUE,
                lines BIGINT NOT NULL DEFAULT 0,
                imported BIGINT NOT NULL DEFAULT 0,
                current BIGINT NOT NULL DEFAULT 0,
                failed TEXT NOT NULL DEFAULT '{{}}',
                state TEXT NOT NULL DEFAULT 'running',
                created_at {float} NOT NULL,
                updated_at {float} NOT NULL
            )""",
            """CREATE TABLE import_account (
                job_id BIGINT NOT NULL REFERENCES import_job (id),
                did TEXT NOT NULL,
                rev TEXT,
                PRIMARY KEY (job_id, did)
            )""",
        ),
    ),
    Migration(
        5,
        "per-host event limits per hour and per day (NULL: the defaults, scaled with the account limit)",
        (
            "ALTER TABLE host ADD COLUMN events_per_hour BIGINT",
            "ALTER TABLE host ADD COLUMN events_per_day BIGINT",
        ),
    ),
)


def _render(db: peewee.Database, statement: str) -> str:
    return statement.format(**(_PG_TYPES if is_postgres(db) else _SQLITE_TYPES))


MAIN_VERSION_TABLE = "schema_version"  # also where every list recorded its versions before the split


def current_version(db: peewee.Database, table: str = MAIN_VERSION_TABLE) -> int:
    db.execute_sql(
        f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at " + ("DOUBLE PRECISION" if is_postgres(db) else "REAL") + " NOT NULL)"
    )
    row = db.execute_sql(f"SELECT MAX(version) FROM {table}").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _param(db: peewee.Database) -> str:
    return "%s" if is_postgres(db) else "?"


def _adopt_legacy_versions(db: peewee.Database, table: str, migrations: Sequence[Migration]) -> None:
    """Move this list's rows (same version and name) from the shared ``schema_version`` to ``table``."""
    if MAIN_VERSION_TABLE not in db.get_tables():
        return
    ours = {(m.version, m.name) for m in migrations}
    rows = db.execute_sql(f"SELECT version, name, applied_at FROM {MAIN_VERSION_TABLE}").fetchall()
    mine = [(int(v), str(n), float(t)) for v, n, t in rows if (int(v), str(n)) in ours]
    if not mine:
        return
    p = _param(db)
    for version, name, applied_at in mine:
        db.execute_sql(f"INSERT INTO {table} (version, name, applied_at) VALUES ({p}, {p}, {p})",
                       (version, name, applied_at))  # fmt: skip
        db.execute_sql(f"DELETE FROM {MAIN_VERSION_TABLE} WHERE version = {p} AND name = {p}", (version, name))
    log.info("schema versions moved from=%s to=%s versions=%s", MAIN_VERSION_TABLE, table, [v for v, _, _ in mine])


def apply_migrations(
    db: peewee.Database, migrations: Sequence[Migration] = MAIN_MIGRATIONS, *, table: str = MAIN_VERSION_TABLE
) -> int:
    """Bring ``db`` to the newest version of ``migrations`` (recorded in ``table``); return it.

    ``StoreError`` if the database records a newer version than ``migrations`` know.
    """
    with db.connection_context():
        have = current_version(db, table)
        if have == 0 and table != MAIN_VERSION_TABLE:
            with db.atomic():
                _adopt_legacy_versions(db, table, migrations)
            have = current_version(db, table)
        newest = migrations[-1].version if migrations else 0
        if have > newest:
            raise StoreError(f"database schema version {have} is newer than this code knows ({newest})")
        for migration in migrations:
            if migration.version <= have:
                continue
            with db.atomic():
                for statement in migration.statements:
                    db.execute_sql(_render(db, statement))
                p = _param(db)
                db.execute_sql(
                    f"INSERT INTO {table} (version, name, applied_at) VALUES ({p}, {p}, {p})",
                    (migration.version, migration.name, time.time()),
                )
            log.info("schema migrated version=%d name=%r", migration.version, migration.name)
        return newest
