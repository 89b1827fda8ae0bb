"""Open a peewee database from a URL: SQLite (WAL, foreign keys) or PostgreSQL (psycopg2).

``sqlite:///relative/or/absolute/path`` and ``postgresql://user:pass@host:port/dbname``.
Under gevent, PostgreSQL connections are made cooperative (a wait callback) so a query yields
to other greenlets instead of blocking the process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any
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


# what a database raises while it is unreachable, restarting, locked or out of space: worth a
# retry. ``InterfaceError`` is not a ``DatabaseError`` in peewee: psycopg2 raises it for a
# pooled connection the server closed while it sat in the pool.
# A PostgreSQL deadlock or serialization failure is an ``OperationalError`` too (raw driver calls
# go through ``DRIVER_ERRORS``): the transaction is simply run again.
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (peewee.OperationalError, peewee.InterfaceError)


class _DriverErrors(peewee.ExceptionWrapper):
    """peewee's driver-error mapping for raw driver calls (``store.sql.executemany``), walking the error's classes.

    ``execute_sql`` maps driver errors to peewee's; a raw ``cursor.executemany`` did not, so a
    PostgreSQL ``DeadlockDetected`` in a batched write escaped the retry of transient errors
    (``TRANSIENT_DB_ERRORS``) and killed the sequencer.
    """

    __slots__ = ()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None or issubclass(exc_type, peewee.PeeweeException):
            return
        for base in exc_type.__mro__:
            new_type = self.exceptions.get(base.__name__)
            if new_type is not None:
                raise new_type(exc_value, *exc_value.args).with_traceback(traceback)


# ``with DRIVER_ERRORS:`` around raw driver calls
DRIVER_ERRORS = _DriverErrors(peewee.EXCEPTIONS)  # type: ignore[attr-defined]


class _PooledPostgres(PooledPostgresqlDatabase):
    """A pool that lets go of a connection the server has closed (a restart), instead of reusing it.

    peewee keeps a thread's (greenlet's) connection open until ``close()``; code that runs
    statements outside ``connection_context`` would get the dead connection back forever
    ("connection already closed"). A connection psycopg2 knows is closed is closed on our side
    too (after the failing statement, or before the next one outside a transaction), which
    makes the pool drop it: the next statement reconnects.
    """

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_sql(sql, params, *args, **kwargs)
        except TRANSIENT_DB_ERRORS:
            self._forget_dead_connection()
            raise

    def cursor(self, *args: Any, **kwargs: Any) -> Any:  # every statement, BEGIN included, starts here
        if not self.in_transaction():
            self._forget_dead_connection()
        return super().cursor(*args, **kwargs)

    def _forget_dead_connection(self) -> None:
        conn = None if self.is_closed() else self._state.conn
        if conn is None or not getattr(conn, "closed", 0) or self.in_transaction():
            return
        try:
            self.close()
        except Exception:  # forget it anyway, and give its place in the pool back
            self._in_use.pop(self.conn_key(conn), None)
            self._state.reset()


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


def native_lock() -> Any:
    """A real OS-thread lock, for state that greenlets and gevent's thread pool share (never a gevent lock)."""
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        return monkey.get_original("_thread", "allocate_lock")()
    import _thread

    return _thread.allocate_lock()


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
    """psycopg2 waits cooperatively on the event loop's thread, and plainly (a real ``poll``) in the thread pool.

    psycogreen's callback in a pool thread would start a gevent hub there for every wait; a
    pool thread exists to block, so it waits on the socket itself (a quarter less time per
    query).
    """
    import psycopg2
    from gevent import monkey
    from gevent.socket import wait_read, wait_write
    from psycopg2 import extensions

    get_ident = monkey.get_original("_thread", "get_ident")
    loop_thread = get_ident()
    poll = monkey.get_original("select", "poll")
    events = {extensions.POLL_READ: 0x001, extensions.POLL_WRITE: 0x004}  # POLLIN, POLLOUT

    def wait(conn: Any, timeout: float | None = None) -> None:
        on_loop = get_ident() == loop_thread
        while True:
            state = conn.poll()
            if state == extensions.POLL_OK:
                return
            if state not in events:
                raise psycopg2.OperationalError(f"bad result from poll: {state!r}")
            if on_loop:
                (wait_read if state == extensions.POLL_READ else wait_write)(conn.fileno(), timeout=timeout)
            else:
                poller = poll()
                poller.register(conn.fileno(), events[state])
                poller.poll(None if timeout is None else timeout * 1000)

    extensions.set_wait_callback(wait)


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
            _PooledPostgres(
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


def ping(db: peewee.Database, *, raise_errors: bool = False) -> bool:
    """True when a trivial query succeeds (for the health endpoint); with ``raise_errors`` a failure raises."""
    try:
        db.execute_sql("SELECT 1").fetchone()
        return True
    except (peewee.DatabaseError, peewee.InterfaceError) as exc:
        if raise_errors:
            raise
        log.warning("database ping failed error=%s", type(exc).__name__)
        return False
