"""Upstream cursors recovered from the event log tail after a crash, including after a FutureCursor reset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest

from actors.sequencer import CHECKPOINT_KEY, recover
from protocol.frames import IdentityEvent, encode_frame
from store.db import open_database
from store.eventlog import EventLog, LogRecord
from store.hosts import ensure_host, get_host, save_cursors, set_state
from store.log_recovery import tail_cursors
from store.migrations import apply_migrations


@pytest.fixture
def db(db_url: str) -> Iterator[peewee.Database]:
    database = open_database(db_url)
    apply_migrations(database)
    yield database
    database.close()


def record(seq: int, host_id: int, upstream_seq: int) -> LogRecord:
    frame = encode_frame(IdentityEvent(seq, f"did:plc:{'a' * 23}{seq % 10}", "2024-01-01T00:00:00Z"))
    return LogRecord(seq, 1_700_000_000.0 + seq, host_id, upstream_seq, frame)


def crash_with_tail(db: peewee.Database, logdir: Path, saved: dict[int, int], tail: list[LogRecord]) -> None:
    """SQL as the last write-behind left it (cursors, checkpoint 0), then ``tail`` logged, then a crash."""
    with db.connection_context():
        save_cursors(db, saved.items())
        set_state(db, CHECKPOINT_KEY, "0")
    log = EventLog(logdir, db)
    log.open(0)
    log.append(tail)
    log.sync()
    log.close()


def test_a_host_reset_by_future_cursor_is_recovered_at_its_new_position(db: peewee.Database, tmp_path: Path) -> None:
    with db.connection_context():
        reset = ensure_host(db, "reset.example").id
        steady = ensure_host(db, "steady.example").id
    # reset.example was at 10, answered FutureCursor (its history restarted) and sent 1..3;
    # steady.example went on from 20; the relay died before writing any of it behind
    tail = [record(1, steady, 21), record(2, reset, 1), record(3, reset, 2), record(4, steady, 22), record(5, reset, 3)]
    crash_with_tail(db, tmp_path / "events", {reset: 10, steady: 20}, tail)
    assert recover(db, EventLog(tmp_path / "events", db)) == 5
    with db.connection_context():
        assert get_host(db, "reset.example").last_seq == 3  # type: ignore[union-attr]  # was 10: its new events skipped
        assert get_host(db, "steady.example").last_seq == 22  # type: ignore[union-attr]


def test_tail_cursors() -> None:
    tail = [record(1, 1, 5), record(2, 2, 7), record(3, 1, 6), record(4, 1, 2), record(5, 1, 3), record(6, 3, 1)]
    assert tail_cursors(tail, {1: 4, 2: 8}) == ({1: 3, 2: 7, 3: 1}, {1, 2})
    assert tail_cursors([record(1, 0, -1)], {}) == ({}, set())
