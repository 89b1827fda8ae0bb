"""Who owns a data directory and its database: one relay process per data directory, one data directory per database.

``lock_data_dir`` takes an exclusive ``flock`` on ``skyrelay.lock`` in the data directory
before any database is opened, so a second ``skyrelay serve`` on the same directory is
refused before it touches anything. The lock dies with the process (kill -9 included).

``claim_database`` binds the main database to the data directory: the directory holds a
random id (``relay-id``) and the database's ``relay_state`` records it. The event log lives in
the data directory and the database describes it (segments, checkpoint, cursors), so a
database that records another directory's id is refused. That catches two relays with
different data directories sharing one PostgreSQL database, whether or not the other one is
running, and a relay restarted on an empty or wrong data directory. It is checked after the
migrations (which need ``relay_state``); a PostgreSQL advisory lock was not used because a
session lock vanishes when the server restarts, and would not catch a relay that is stopped.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

import peewee

from store.db import StoreError
from store.hosts import get_state
from store.sql import execute

LOCK_NAME = "skyrelay.lock"
ID_NAME = "relay-id"
STATE_KEY = "data_dir_id"
_CLAIM = "INSERT INTO relay_state (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"


class DataDirInUse(StoreError):
    """Another process holds the data directory."""


def lock_data_dir(data_dir: Path) -> int:
    """Hold the data directory's lock for this process's life; the descriptor. ``DataDirInUse`` if taken."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUse(f"data directory {data_dir} is in use by another skyrelay process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def data_dir_id(data_dir: Path) -> str:
    """The directory's id, made (and fsynced) on first use."""
    path = data_dir / ID_NAME
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return value


def claim_database(db: peewee.Database, data_dir: Path) -> None:
    """Record the data directory's id in a database that has none; ``StoreError`` if it has another's."""
    with db.connection_context():
        recorded = get_state(db, STATE_KEY)
        if recorded is None:  # first claim; of two relays racing for it, one wins
            with db.atomic():
                execute(db, _CLAIM, (STATE_KEY, data_dir_id(data_dir)))
            recorded = get_state(db, STATE_KEY)
    if not (data_dir / ID_NAME).exists() or recorded != data_dir_id(data_dir):
        raise StoreError(
            f"the database belongs to another data directory (relay id {recorded}), not {data_dir}:"
            " run this relay with that data directory, or give it a database of its own"
        )
