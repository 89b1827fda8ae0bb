"""The durable event log: round trips, cursors, durability boundary, torn tails, SQL reconciliation, retention."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest

from store.db import open_database
from store.eventlog import EventLog, EventLogError, LogRecord, RecoveryInfo
from store.migrations import apply_migrations
from store.segments import BODY, HEADER_SIZE, MAGIC, PREFIX, encode_run, segment_name

T0 = 1_700_000_000.0


def frame_for(seq: int, size: int | None = None) -> bytes:
    """A recognisable frame for ``seq``: its 8 bytes repeated, 60-800 bytes unless ``size`` is given."""
    size = 60 + (seq * 37) % 740 if size is None else size
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]


def rec(seq: int, *, host: int = 0, up: int = -1, at: float | None = None, size: int | None = None) -> LogRecord:
    return LogRecord(seq, T0 + seq if at is None else at, host, up, frame_for(seq, size))


def recs(seqs: range | list[int], **kw: int) -> list[LogRecord]:
    return [rec(s, **kw) for s in seqs]


@pytest.fixture
def db(db_url: str) -> Iterator[peewee.Database]:
    database = open_database(db_url)
    apply_migrations(database)
    yield database
    database.close()


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "log"


def opened(logdir: Path, db: peewee.Database, **kw: Any) -> tuple[EventLog, RecoveryInfo]:
    log = EventLog(logdir, db, **kw)
    return log, log.open()


def read_all(log: EventLog, cursor: int = 0, batch: int = 1000) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while True:
        got = log.read_after(cursor, batch)
        if not got:
            return out
        assert len(got) <= batch
        out += got
        cursor = got[-1][0]


def pairs(records: list[LogRecord]) -> list[tuple[int, bytes]]:
    return [(r.seq, r.frame) for r in records]


def seg_files(logdir: Path) -> list[str]:
    return sorted(p.name for p in logdir.iterdir() if p.suffix == ".seg")


def sql_rows(db: peewee.Database) -> dict[str, tuple[int, int, int, bool]]:
    rows = db.execute_sql("SELECT path, first_seq, last_seq, byte_size, sealed FROM log_segment").fetchall()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3]), bool(r[4])) for r in rows}


def write_log(logdir: Path, db: peewee.Database, records: list[LogRecord], batch: int = 10, **kw: Any) -> None:
    log, _ = opened(logdir, db, **kw)
    for i in range(0, len(records), batch):
        log.append(records[i : i + batch])
        log.sync()
    log.close()


# seqs with gaps, a frame larger than a whole segment, several batch sizes
SEQS = [*range(1, 120), *range(130, 260, 3), 300, 301, *range(400, 520)]


def test_round_trip_across_segment_rolls(logdir: Path, db: peewee.Database) -> None:
    records = recs(SEQS)
    records[50] = rec(records[50].seq, size=9000)
    log, info = opened(logdir, db, segment_max_bytes=4096)
    assert info == RecoveryInfo(0, 0, {}, [])
    i = 0
    for size in [1, 7, 64, 3, 100, 250]:
        log.append(records[i : i + size])
        log.sync()
        i += size
    assert log.read_after(0, 10_000) == pairs(records[:i])
    log.append(records[i:])
    log.sync()
    assert (log.first_seq, log.last_seq) == (1, SEQS[-1])
    for batch in (1, 5, 1000):
        assert read_all(log, 0, batch) == pairs(records)
    files = seg_files(logdir)
    assert len(files) > 20
    log.close()

    rows = sql_rows(db)
    assert sorted(rows) == files
    by_first = {r.seq: r for r in records}
    for n, name in enumerate(files):
        first, _last, size, sealed = rows[name]
        assert name == segment_name(first) and first in by_first
        assert size == (logdir / name).stat().st_size
        assert sealed == (n < len(files) - 1)
    assert rows[files[-1]][1] == SEQS[-1]

    log, info = opened(logdir, db, segment_max_bytes=4096)
    assert info.last_seq == SEQS[-1] and info.truncated_bytes == 0
    assert info.tail == records  # checkpoint 0: everything
    assert read_all(log, 0, 33) == pairs(records)
    log.close()


@pytest.mark.parametrize("reopen", [False, True], ids=["live", "reopened"])
def test_every_cursor_reads_from_the_right_place(logdir: Path, db: peewee.Database, reopen: bool) -> None:
    # one big segment (sparse index of many entries) then several small ones
    records = recs(range(1, 1500, 2), size=40) + recs([2000 + s for s in SEQS])
    log, _ = opened(logdir, db, segment_max_bytes=64 * 1024)
    log.append(records)
    log.sync()
    if reopen:
        log.close()
        log, _ = opened(logdir, db, segment_max_bytes=64 * 1024)
    seqs = [r.seq for r in records]
    last = seqs[-1]
    for cursor in [-5, *range(0, last + 3)]:
        start = next((i for i, s in enumerate(seqs) if s > cursor), len(seqs))
        assert log.read_after(cursor, 4) == pairs(records[start : start + 4]), cursor
    assert log.read_after(last) == []
    assert log.read_after(last + 100) == []
    assert log.read_after(0, 0) == []
    log.close()


def test_unsynced_records_are_invisible_to_readers(logdir: Path, db: peewee.Database) -> None:
    log, _ = opened(logdir, db, segment_max_bytes=2048)
    log.append(recs(range(1, 4)))
    assert (log.last_seq, log.first_seq) == (0, 0)
    assert log.read_after(0) == []
    log.sync()
    assert [s for s, _ in log.read_after(0)] == [1, 2, 3]
    log.append(recs(range(4, 40)))  # rolls several segments, all fsynced at the roll but not published
    assert len(seg_files(logdir)) > 3
    assert log.last_seq == 3
    assert [s for s, _ in log.read_after(0)] == [1, 2, 3]
    assert log.read_after(3) == []
    log.sync()
    assert log.last_seq == 39
    assert [s for s, _ in read_all(log, 2, 5)] == list(range(3, 40))
    log.close()


def last_record_offset(path: Path) -> int:
    data = path.read_bytes()
    off = last = 0
    while off < len(data):
        last = off
        _magic, length, _crc = PREFIX.unpack_from(data, off)
        off += HEADER_SIZE + length
    return last


def test_torn_tail_at_every_offset_keeps_the_good_prefix(logdir: Path, db: peewee.Database) -> None:
    records = [*recs(range(1, 30)), rec(30, host=7, up=99, size=50)]
    write_log(logdir, db, records, batch=8, segment_max_bytes=1 << 20)
    path = logdir / seg_files(logdir)[-1]
    data = path.read_bytes()
    start = last_record_offset(path)
    assert len(data) - start == HEADER_SIZE + 50
    for cut in range(start, len(data)):
        path.write_bytes(data[:cut])
        log, info = opened(logdir, db)
        assert info.last_seq == 29 and log.last_seq == 29
        assert info.truncated_bytes == cut - start
        assert path.stat().st_size == start
        assert info.tail == records[:-1]
        assert read_all(log) == pairs(records[:-1])
        log.append([rec(30, size=10)])  # seq 30 was never durable: it may be used again
        log.sync()
        assert log.read_after(29) == [(30, frame_for(30, 10))]
        log.close()


def test_torn_first_record_of_a_new_segment_removes_the_file(logdir: Path, db: peewee.Database) -> None:
    records = recs(range(1, 22), size=200)  # 4 records per segment
    write_log(logdir, db, records, batch=21, segment_max_bytes=1000)
    files = seg_files(logdir)
    newest = logdir / files[-1]
    data = newest.read_bytes()
    assert len(data) == HEADER_SIZE + 200 and files[-1] == segment_name(21)  # one record
    for cut in (0, 1, HEADER_SIZE, len(data) - 1):
        newest.write_bytes(data[:cut])
        log, info = opened(logdir, db, segment_max_bytes=1000)
        assert info.last_seq == 20 and info.truncated_bytes == cut
        assert seg_files(logdir) == files[:-1]
        assert sorted(sql_rows(db)) == files[:-1]
        assert not sql_rows(db)[files[-2]][3]  # the previous segment is active again
        assert read_all(log) == pairs(records[:-1])
        log.close()
        newest.write_bytes(data)


def test_empty_segment_left_by_a_crash_during_roll_is_removed(logdir: Path, db: peewee.Database) -> None:
    write_log(logdir, db, recs(range(1, 11)))
    (logdir / segment_name(11)).touch()
    log, info = opened(logdir, db)
    assert info.last_seq == 10 and info.truncated_bytes == 0
    assert seg_files(logdir) == [segment_name(1)]
    log.append(recs(range(11, 13)))
    log.sync()
    assert [s for s, _ in read_all(log)] == list(range(1, 13))
    log.close()


def forged_record(seq: int, length: int = 20) -> bytes:
    """A record header with a wrong crc claiming ``length`` frame bytes, followed by at most 20."""
    return PREFIX.pack(MAGIC, length, 12345) + BODY.pack(seq, T0, 0, -1) + b"x" * min(length, 20)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00",
        b"\xff" * 43,
        b"\x00" * 44,
        os.urandom(5000),
        forged_record(11),  # plausible header, wrong crc
        forged_record(11, length=1 << 30),  # absurd length
    ],
    ids=["1-byte", "43-bytes", "zero-header", "random", "bad-crc", "huge-length"],
)
def test_garbage_after_the_last_record_is_cut(logdir: Path, db: peewee.Database, garbage: bytes) -> None:
    records = recs(range(1, 11))
    write_log(logdir, db, records)
    path = logdir / seg_files(logdir)[-1]
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(garbage)
    log, info = opened(logdir, db)
    assert info.truncated_bytes == len(garbage) and info.last_seq == 10
    assert path.stat().st_size == size
    assert read_all(log) == pairs(records)
    log.close()


def test_a_well_formed_record_that_does_not_increase_the_seq_is_cut(logdir: Path, db: peewee.Database) -> None:
    records = recs(range(1, 11))
    write_log(logdir, db, records)
    duplicate = encode_run([rec(10, size=30)], 0, 0)[0]  # a valid record with a repeated seq
    path = logdir / segment_name(1)
    with path.open("ab") as f:
        f.write(duplicate)
    log, info = opened(logdir, db)
    assert info.truncated_bytes == len(duplicate) and read_all(log) == pairs(records)
    log.close()


def test_corrupt_crc_in_the_newest_segment_cuts_from_that_record(logdir: Path, db: peewee.Database) -> None:
    records = recs(range(1, 21), size=100)
    write_log(logdir, db, records)
    path = logdir / seg_files(logdir)[-1]
    data = bytearray(path.read_bytes())
    rec_size = HEADER_SIZE + 100
    data[12 * rec_size + HEADER_SIZE + 50] ^= 0x01  # inside the frame of seq 13
    path.write_bytes(bytes(data))
    log, info = opened(logdir, db)
    assert info.last_seq == 12 and info.truncated_bytes == 8 * rec_size
    assert read_all(log) == pairs(records[:12])
    log.close()


def test_corrupt_sealed_segment_stops_reads_there(
    logdir: Path, db: peewee.Database, caplog: pytest.LogCaptureFixture
) -> None:
    records = recs(range(1, 41), size=100)
    write_log(logdir, db, records, segment_max_bytes=1000)  # 6 records per segment
    oldest = logdir / seg_files(logdir)[0]
    data = bytearray(oldest.read_bytes())
    data[3 * (HEADER_SIZE + 100) + HEADER_SIZE + 1] ^= 0x80  # seq 4
    oldest.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="store.log_recovery"):
        log, info = opened(logdir, db, segment_max_bytes=1000)
        got = read_all(log)
    assert info.last_seq == 40 and info.truncated_bytes == 0  # sealed and the right size: trusted at open
    assert [s for s, _ in got] == [1, 2, 3, *range(7, 41)]
    assert info.tail == records[:3] + records[6:]
    assert "sealed segment corrupt" in caplog.text
    log.close()


def test_sql_is_reconciled_with_the_files(logdir: Path, db: peewee.Database) -> None:
    records = recs(range(1, 61), size=100)
    write_log(logdir, db, records, segment_max_bytes=1000)
    files = seg_files(logdir)
    expected = sql_rows(db)
    assert sorted(expected) == files and len(files) == 10

    db.execute_sql("DELETE FROM log_segment")
    p = db.param
    db.execute_sql(
        "INSERT INTO log_segment (path, first_seq, last_seq, first_time, last_time, byte_size, sealed)"
        f" VALUES ({p}, 1000, 1001, 0, 0, 10, {p})",
        (segment_name(1000), True),
    )
    log, _ = opened(logdir, db, segment_max_bytes=1000)
    log.close()
    assert sql_rows(db) == expected  # missing rows added, the row without a file removed

    p = db.param
    db.execute_sql(f"UPDATE log_segment SET byte_size = 1, last_seq = 2 WHERE path = {p}", (files[3],))
    (logdir / files[0]).unlink()
    log, info = opened(logdir, db, segment_max_bytes=1000)
    assert log.first_seq == 7 and info.last_seq == 60
    assert read_all(log) == pairs(records[6:])
    log.close()
    del expected[files[0]]
    assert sql_rows(db) == expected  # the wrong row was rescanned and fixed


def test_prune_removes_whole_segments_older_than_retention(logdir: Path, db: peewee.Database) -> None:
    records = recs(range(1, 61), size=100)  # record n accepted at T0 + n
    kw: dict[str, Any] = {"segment_max_bytes": 1000, "retention_seconds": 20.0}
    write_log(logdir, db, records, **kw)
    log, _ = opened(logdir, db, **kw)
    assert log.read_after(0, 3) == pairs(records[:3])  # remembers where seq 3 ends, in a segment about to go
    assert log.read_after(3, 3) == pairs(records[3:6])  # and seq 6, at the end of it
    assert log.prune(now=T0 + 20) == 0
    assert log.prune(now=T0 + 32.5) == 12  # segments ending at seq 6 and 12 (< T0 + 12.5)
    assert log.first_seq == 13
    assert seg_files(logdir)[0] == segment_name(13)
    assert sorted(sql_rows(db)) == seg_files(logdir)
    assert read_all(log) == pairs(records[12:])
    for cursor in (3, 6, 0, 12):  # a cursor before the retained log starts at its start
        assert log.read_after(cursor, 2) == pairs(records[12:14])
    log.close()

    log, _ = opened(logdir, db, **kw)
    assert log.prune(now=T0 + 10_000) == 60 - 12 - 6  # never the active segment (seqs 55-60)
    assert seg_files(logdir) == [segment_name(55)]
    assert read_all(log) == pairs(records[54:])
    log.append([rec(61)])
    log.sync()
    assert log.read_after(60) == pairs([rec(61)])
    log.close()


def test_reopen_continues_the_seq_and_refuses_bad_appends(logdir: Path, db: peewee.Database) -> None:
    write_log(logdir, db, recs(range(1, 11)))
    log, info = opened(logdir, db)
    assert info.last_seq == 10 == log.last_seq
    with pytest.raises(ValueError, match="does not increase"):
        log.append(recs([11, 12, 12]))
    with pytest.raises(ValueError, match="does not increase"):
        log.append([rec(10)])
    with pytest.raises(ValueError, match="over"):
        log.append([rec(11), LogRecord(12, T0, 0, -1, b"x" * (16 * 2**20 + 1))])
    log.sync()
    assert log.last_seq == 10 and [s for s, _ in read_all(log)] == list(range(1, 11))  # nothing of those batches
    log.append(recs([11, 12]))
    log.sync()
    log.close()
    log, info = opened(logdir, db)
    assert info.last_seq == 12 and [s for s, _ in read_all(log)] == list(range(1, 13))
    log.close()


def test_recovery_info_reports_the_tail_after_the_checkpoint(logdir: Path, db: peewee.Database) -> None:
    records = [rec(s, host=s % 3, up=1000 - s if s % 3 == 2 else s * 10, size=50) for s in range(1, 31)]
    write_log(logdir, db, records, segment_max_bytes=500)
    assert len(seg_files(logdir)) == 6
    for checkpoint in (0, 12, 29, 30, 99):
        tail = records[checkpoint:]
        expected: dict[int, int] = {}
        for r in tail:
            if r.host_id:
                expected[r.host_id] = max(expected.get(r.host_id, -1), r.upstream_seq)
        log = EventLog(logdir, db, segment_max_bytes=500)
        info = log.open(checkpoint_seq=checkpoint)
        assert info.tail == tail and info.host_cursors == expected and info.last_seq == 30
        log.close()
    assert expected == {} and info.tail == []
    log = EventLog(logdir, db)
    assert log.open(checkpoint_seq=12).host_cursors == {1: 280, 2: 1000 - 14}
    log.close()


def test_empty_log_and_single_writer(logdir: Path, db: peewee.Database) -> None:
    log, info = opened(logdir, db)
    assert info == RecoveryInfo(0, 0, {}, [])
    assert (log.first_seq, log.last_seq, log.read_after(0), log.prune(now=T0 * 2)) == (0, 0, [], 0)
    log.sync()
    with pytest.raises(EventLogError, match="in use"):
        EventLog(logdir, db).open()
    with pytest.raises(EventLogError, match="already open"):
        log.open()
    log.close()
    log.close()  # idempotent
    with pytest.raises(EventLogError, match="not open"):
        log.append([rec(1)])
    with pytest.raises(EventLogError, match="not open"):
        log.read_after(0)
    log, info = opened(logdir, db)
    assert info.last_seq == 0 and seg_files(logdir) == []
    log.close()
