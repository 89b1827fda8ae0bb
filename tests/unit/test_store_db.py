"""The database layer: URLs, migrations (idempotent, versioned, refused when newer)."""

from __future__ import annotations

import peewee
import pytest

from store.db import StoreError, open_database, ping
from store.migrations import MAIN_MIGRATIONS, Migration, apply_migrations, current_version


def test_migrations_apply_once_and_record_version(db_url: str) -> None:
    db = open_database(db_url)
    newest = MAIN_MIGRATIONS[-1].version
    assert apply_migrations(db) == newest
    assert apply_migrations(db) == newest  # idempotent
    with db.connection_context():
        assert current_version(db) == newest
        rows = db.execute_sql("SELECT COUNT(*) FROM schema_version").fetchone()
        assert rows[0] == len(MAIN_MIGRATIONS)
        db.execute_sql("INSERT INTO relay_state (key, value) VALUES ('k', 'v')")
        assert db.execute_sql("SELECT value FROM relay_state").fetchone()[0] == "v"
    assert ping(db)


def test_newer_database_is_refused(db_url: str) -> None:
    db = open_database(db_url)
    extra = (*MAIN_MIGRATIONS, Migration(999, "future", ("CREATE TABLE future_thing (x INTEGER)",)))
    apply_migrations(db, extra)
    with pytest.raises(StoreError, match="newer"):
        apply_migrations(db)


def test_failed_migration_rolls_back(db_url: str) -> None:
    db = open_database(db_url)
    apply_migrations(db)
    broken = (
        *MAIN_MIGRATIONS,
        Migration(MAIN_MIGRATIONS[-1].version + 1, "broken", ("CREATE TABLE ok_table (x INTEGER)", "NOT SQL")),
    )
    with pytest.raises(peewee.DatabaseError):
        apply_migrations(db, broken)
    with db.connection_context():
        assert current_version(db) == MAIN_MIGRATIONS[-1].version
        tables = db.get_tables()
    assert "ok_table" not in tables


def test_bad_urls_are_refused(tmp_path) -> None:
    with pytest.raises(StoreError):
        open_database("mysql://x/y")
    with pytest.raises(StoreError):
        open_database("sqlite://")
    db = open_database(f"sqlite:///{tmp_path}/sub/dir/x.sqlite")
    assert ping(db)
    assert (tmp_path / "sub" / "dir").is_dir()
