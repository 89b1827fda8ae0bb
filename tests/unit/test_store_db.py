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


def test_batched_statements_raise_peewee_errors(db_url: str) -> None:
    """A raw ``executemany`` raises peewee's error types, as ``execute_sql`` does (the retry logic catches those)."""
    from store.sql import execute, executemany

    db = open_database(db_url)
    with db.connection_context():
        execute(db, "CREATE TABLE t_unique (k INTEGER PRIMARY KEY)")
        with pytest.raises(peewee.IntegrityError), db.atomic():
            executemany(db, "INSERT INTO t_unique (k) VALUES (?)", [(1,), (1,)])
    db.close()


def test_postgres_deadlock_is_a_transient_error(db_url: str) -> None:
    """A deadlock in a batched write reaches callers as peewee.OperationalError (retried), not psycopg2's own error."""
    import threading

    from store.db import TRANSIENT_DB_ERRORS, is_postgres
    from store.sql import execute, executemany

    db = open_database(db_url)
    if not is_postgres(db):
        pytest.skip("row-lock deadlocks are PostgreSQL's; SQLite locks the whole database")
    with db.connection_context():
        execute(db, "CREATE TABLE t_lock (k INTEGER PRIMARY KEY, v INTEGER)")
        execute(db, "INSERT INTO t_lock (k, v) VALUES (1, 0), (2, 0)")
    first_locked = [threading.Event(), threading.Event()]
    errors: list[BaseException] = []

    def writer(me: int) -> None:
        mine, other = (1, 2) if me == 0 else (2, 1)
        try:
            with db.connection_context(), db.atomic():
                execute(db, "UPDATE t_lock SET v = v + 1 WHERE k = ?", (mine,))
                first_locked[me].set()
                first_locked[1 - me].wait(10)
                executemany(db, "UPDATE t_lock SET v = v + 1 WHERE k = ?", [(other,)])
        except BaseException as exc:  # the test inspects what was raised
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    db.close()
    assert len(errors) == 1, errors  # PostgreSQL breaks the cycle by failing one of the two
    assert isinstance(errors[0], TRANSIENT_DB_ERRORS), type(errors[0])
