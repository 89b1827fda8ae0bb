"""Open a peewee database from a URL: SQLite (WAL, foreign keys) or PostgreSQL (psycopg2).

``sqlite:///relative/or/absolute/path`` and ``postgresql://user:pass@host:port/dbname``.
Under gevent, PostgreSQL connections are made cooperative with psycogreen so a query yields
to other greenlets instead of blocking the process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import peewee
from playhouse.pool import PooledPostgresqlDatabase

log = logging.getLogger(__name__)

SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),
    ("foreign_keys", 1),
    ("synchronous", "normal"),  # durable at checkpoints; the event log has its own fsync
    ("busy_timeout", 10_000),
    ("cache_size", -64_000),  # 64 MB page cache
)


class StoreError(Exception):
    """The database cannot be opened or its schema is from a newer version."""


def _gevent_active() -> bool:
    if "gevent.monkey" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


def _native_rlock() -> object:
    """A real OS-thread RLock even after gevent's monkey-patching (which makes ``threading.RLock`` a greenlet lock)."""
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        return monkey.get_original("_thread", "RLock")()
    import _thread

    return _thread.RLock()


def _shareable_with_threads(db: peewee.Database) -> peewee.Database:
    """Make ``db`` safe to use from greenlets and from gevent's thread pool at once.

    peewee guards connect/close (and a pool's free list) with ``threading.Lock``; under gevent
    that is a greenlet lock, and a greenlet waiting for it is never woken when a thread-pool
    thread releases it (gevent issue 2013): the greenlet, and the host it reads, stalls forever.
    A native lock is held only across non-blocking work here, so greenlets may wait on it.
    """
    db._lock = _native_rlock()  # type: ignore[attr-defined]
    if isinstance(db, PooledPostgresqlDatabase):  # the pool's free list has a lock of its own
        import threading

        pool_lock = _native_rlock()
        db._pool_lock = pool_lock
        # waiting for a free connection (the pool is full) wakes at least every second anyway
        db._pool_available = threading.Condition(pool_lock)  # type: ignore[arg-type]
    return db


def _make_psycopg_green() -> None:
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()


def open_database(url: str) -> peewee.Database:
    """A connected-on-demand peewee ``Database`` for ``url``; ``StoreError`` if unusable."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        raw = unquote(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else ""
        if not raw:
            raise StoreError("sqlite URL must be sqlite:///PATH (use sqlite:///:memory: for memory)")
        if raw != ":memory:":
            Path(raw).parent.mkdir(parents=True, exist_ok=True)
        return _shareable_with_threads(peewee.SqliteDatabase(raw, pragmas=SQLITE_PRAGMAS, check_same_thread=False))
    if parts.scheme in ("postgresql", "postgres"):
        if _gevent_active():
            _make_psycopg_green()
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return _shareable_with_threads(
            PooledPostgresqlDatabase(
                (parts.path or "/").lstrip("/") or "postgres",
                user=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                host=parts.hostname or None,
                port=parts.port or None,
                max_connections=int(options.pop("max_connections", "32")),
                stale_timeout=300,
                timeout=30,
                **options,
            )
        )
    raise StoreError(f"unsupported database URL scheme {parts.scheme!r}")


def is_postgres(db: peewee.Database) -> bool:
    return isinstance(db, peewee.PostgresqlDatabase)


def ping(db: peewee.Database) -> bool:
    """True when a trivial query succeeds (for the health endpoint)."""
    try:
        db.execute_sql("SELECT 1").fetchone()
        return True
    except peewee.DatabaseError as exc:
        log.warning("database ping failed error=%s", type(exc).__name__)
        return False
