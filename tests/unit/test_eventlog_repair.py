"""The event log after a failed write (a full disk): refuse appends, keep serving reads, repair in place.

Writes fail through a stand-in for ``os.write`` that refuses the log's own file descriptor with
ENOSPC, after writing part of the data when asked (a torn record, as a real full disk leaves).
The end-to-end version with a real full filesystem is ``tests/integration/test_chaos.py``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest

from store.db import open_database
from store.eventlog import EventLog, EventLogError, EventLogWriteError, LogRecord
from store.migrations import apply_migrations
from store.segments import segment_name


def rec(seq: int, size: int = 200) -> LogRecord:
    return LogRecord(seq, 1_700_000_000.0 + seq, 1, seq, (seq.to_bytes(8, "little") * (size // 8 + 1))[:size])


@pytest.fixture
def db(tmp_path: Path) -> Iterator[peewee.Database]:
    database = open_database(f"sqlite:///{tmp_path / 'main.sqlite'}")
    apply_migrations(database)
    yield database
    database.close()


class FullDisk:
    """Make ``os.write`` on the event log's active file fail with ENOSPC (after ``partial`` bytes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, log: EventLog, partial: int = 0) -> None:
        self.real = os.write
        self.log = log
        self.partial = partial
        self.failures = 0
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data: Any) -> int:
        if fd != self.log._wfd:
            return self.real(fd, data)
        if self.partial:
            n, self.partial = self.real(fd, bytes(data[: self.partial])), 0
            return n
        self.failures += 1
        raise OSError(errno.ENOSPC, "No space left on device")


def read_all(log: EventLog) -> list[int]:
    return [seq for seq, _ in log.read_after(0, 100_000)]


def test_a_failed_write_is_refused_until_repaired_and_nothing_is_lost(
    tmp_path: Path, db: peewee.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = EventLog(tmp_path / "log", db)
    log.open()
    log.append([rec(s) for s in range(1, 11)])
    log.sync()
    disk = FullDisk(monkeypatch, log, partial=300)  # one and a half records, then ENOSPC
    with pytest.raises(EventLogWriteError):
        log.append([rec(s) for s in range(11, 21)])
    assert disk.failures == 1
    with pytest.raises(EventLogWriteError, match="until repaired"):
        log.append([rec(21)])
    assert read_all(log) == list(range(1, 11))  # readers keep the durable records
    monkeypatch.setattr(os, "write", disk.real)  # space is back
    log.repair()
    assert log.last_seq == 10
    log.append([rec(s) for s in range(11, 21)])
    log.sync()
    assert read_all(log) == list(range(1, 21))
    log.close()
    again = EventLog(tmp_path / "log", db)
    info = again.open()
    assert info.truncated_bytes == 0  # the repair left no torn record behind
    assert read_all(again) == list(range(1, 21))
    again.close()


def test_a_write_failing_after_a_segment_roll_keeps_what_the_roll_made_durable(
    tmp_path: Path, db: peewee.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = EventLog(tmp_path / "log", db, segment_max_bytes=4096)
    log.open()
    log.append([rec(1)])
    log.sync()
    real = os.write
    calls = {"n": 0}

    def second_write_fails(fd: int, data: Any) -> int:
        if fd == log._wfd:
            calls["n"] += 1
            if calls["n"] == 2:  # the run after the roll, into the new segment
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", second_write_fails)
    batch = [rec(s, size=1000) for s in range(2, 12)]  # rolls after a few records
    with pytest.raises(EventLogWriteError):
        log.append(batch)
    monkeypatch.setattr(os, "write", real)
    log.repair()
    kept = log.last_seq
    assert 1 < kept < 11  # the records before the roll were fsynced by it
    assert read_all(log) == list(range(1, kept + 1))
    assert not (tmp_path / "log" / segment_name(kept + 1)).exists()  # the empty new segment is gone
    log.append([r for r in batch if r.seq > kept])  # what a sequencer retrying the batch does
    log.sync()
    assert read_all(log) == list(range(1, 12))
    log.close()
    again = EventLog(tmp_path / "log", db, segment_max_bytes=4096)
    assert again.open().truncated_bytes == 0
    assert read_all(again) == list(range(1, 12))
    again.close()


def test_a_failed_fsync_is_not_repaired_in_place(
    tmp_path: Path, db: peewee.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = EventLog(tmp_path / "log", db)
    log.open()
    log.append([rec(1)])

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("store.eventlog._fdatasync", fsync_fails)
    with pytest.raises(EventLogError) as failed:
        log.sync()
    assert not isinstance(failed.value, EventLogWriteError)  # not something to retry
    with pytest.raises(EventLogError, match="cannot be repaired in place"):
        log.repair()
