"""The relay's durable output event log: append and fsync final frames, replay them by cursor.

Every accepted event is appended as its final output frame with the relay's seq, and made
durable by ``sync()`` before it is broadcast; firehose consumers replay with ``read_after``.
Records live in append-only segment files (format in ``store.segments``) named by first seq;
the ``log_segment`` table mirrors their metadata but ``open()`` trusts the files: it truncates
a torn or corrupt tail, drops empty files and rewrites the table to match.

Concurrency: one writer (one ``EventLog`` per directory, guarded by a ``flock``; one event log
per database, since ``open()`` makes the table describe exactly its own directory), any number
of reader greenlets in the same process. Readers see only records made durable by ``sync()``.
Other processes may read the files (append-only, every record crc-checked, so a reader stops
at a record still being written), but nothing tells them how far is durable. File I/O blocks
the process (gevent does not make it cooperative); SQL may yield, and the in-memory state is
consistent whenever it does. After a failed write (``EventLogWriteError``: a full disk) the
log refuses appends until ``repair()`` cuts it back to its last whole record. After a failed
fsync it refuses them until it is closed and opened again (the page cache may have dropped
data: a process restart and recovery decide what survived).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import peewee

from store.log_recovery import ensure_index, fsync_dir, lock_directory, recover_segments, remove_stray_segments
from store.segment_list import SegmentList
from store.segment_table import SegmentTable
from store.segments import (
    HEADER_SIZE,
    MAX_FRAME_BYTES,
    EventLogError,
    EventLogWriteError,
    LogRecord,
    Segment,
    encode_run,
    segment_name,
)

__all__ = ["EventLog", "EventLogError", "EventLogWriteError", "LogRecord", "RecoveryInfo"]

log = logging.getLogger(__name__)

_fdatasync = getattr(os, "fdatasync", os.fsync)


@dataclass(frozen=True, slots=True)
class RecoveryInfo:
    last_seq: int  # 0 when empty
    truncated_bytes: int  # torn tail removed at open
    host_cursors: dict[int, int]  # host_id -> highest upstream_seq found in the log tail after `checkpoint_seq`
    tail: list[LogRecord]  # records with seq > checkpoint_seq (for the caller to re-apply account state)


class EventLog:
    """Segmented, fsynced, cursor-replayable log of output frames (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        db: peewee.Database,
        *,
        segment_max_bytes: int = 64 * 2**20,
        retention_seconds: float = 72 * 3600,
        metadata_interval_seconds: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self._table = SegmentTable(db)
        self._segment_max_bytes = segment_max_bytes
        self._retention_seconds = retention_seconds
        self._metadata_interval = metadata_interval_seconds
        self._segs = SegmentList([])
        self._lock_fd = -1
        self._wfd = -1  # append fd of the active (last) segment
        self._appended_seq = 0
        self._durable_seq = 0
        self._metadata_due = 0.0  # monotonic time of the next periodic metadata flush
        self._broken: str | None = None
        self._repairable = False  # the failure was a write: repair() may fix it in place

    # -- open and recovery ---------------------------------------------------------------

    def open(self, checkpoint_seq: int = 0) -> RecoveryInfo:
        """Lock the directory, repair the newest segment, reconcile SQL; return the tail after checkpoint.

        The tail is read into memory whole: pass the seq up to which the caller's own state is
        known to be saved, not 0, once the log is large.
        """
        if self._lock_fd >= 0:
            raise EventLogError("event log is already open")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_directory(self.directory)
        try:
            truncated = self._recover()
        except BaseException:
            self._release()
            raise
        tail: list[LogRecord] = []
        self._segs.read(checkpoint_seq, sys.maxsize, self._durable_seq, tail, full=True)
        host_cursors: dict[int, int] = {}
        for rec in tail:
            if rec.host_id and rec.upstream_seq > host_cursors.get(rec.host_id, -1):
                host_cursors[rec.host_id] = rec.upstream_seq
        log.info(
            "event log opened dir=%s segments=%d first_seq=%d last_seq=%d truncated_bytes=%d tail=%d",
            self.directory,
            len(self._segs.items),
            self.first_seq,
            self.last_seq,
            truncated,
            len(tail),
        )
        return RecoveryInfo(self.last_seq, truncated, host_cursors, tail)

    def _recover(self) -> int:
        rows = self._table.load()
        segments, truncated = recover_segments(self.directory, rows)
        self._segs = SegmentList(segments)
        self._table.reconcile(rows, segments)
        if segments:
            active = segments[-1]
            self._wfd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
            self._appended_seq = self._durable_seq = active.last_seq
        self._metadata_due = time.monotonic() + self._metadata_interval
        return truncated

    # -- writing ---------------------------------------------------------------------------

    def append(self, records: Sequence[LogRecord]) -> None:
        """Write records (seqs strictly increasing past ``last_seq``) with one write per segment touched.

        Not durable nor visible to readers until ``sync()``. ``ValueError`` for a bad seq or an
        oversized frame (nothing of the batch is written then).
        """
        self._check_writable()
        if not records:
            return
        max_bytes = self._segment_max_bytes
        size = self._segs.items[-1].size if self._segs.items else -1  # -1: no segment yet
        last = self._appended_seq
        starts: list[int] = []  # indexes of records that begin a new segment
        for i, rec in enumerate(records):
            if rec.seq <= last:
                raise ValueError(f"event log seq {rec.seq} does not increase past {last}")
            if len(rec.frame) > MAX_FRAME_BYTES:
                raise ValueError(f"event log frame of {len(rec.frame)} bytes is over {MAX_FRAME_BYTES}")
            last = rec.seq
            need = HEADER_SIZE + len(rec.frame)
            if size < 0 or (size > 0 and size + need > max_bytes):
                starts.append(i)
                size = 0
            size += need
        rolls = set(starts)
        for a, b in pairwise([0, *[s for s in starts if s], len(records)]):
            if a in rolls:
                self._roll(records[a])
            self._write(records[a:b])
        if rolls:
            self._flush_metadata()  # the new segment's row, and the sealed one's

    def _write(self, records: Sequence[LogRecord]) -> None:
        seg = self._segs.items[-1]
        assert seg.count is not None and seg.index_seqs is not None
        data, seqs, offsets = encode_run(records, seg.size, seg.count)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._wfd, view) :]
        except OSError as exc:
            self._broken, self._repairable = f"write failed: {exc}", True
            try:
                os.ftruncate(self._wfd, seg.size)
            except OSError:
                pass  # repair() or open() will cut the partial record
            raise EventLogWriteError(f"event log write failed: {exc}") from exc
        seg.index_seqs.extend(seqs)
        seg.index_offsets.extend(offsets)
        seg.size += len(data)
        seg.count += len(records)
        seg.last_seq, seg.last_time = records[-1].seq, records[-1].time
        self._appended_seq = seg.last_seq

    def _roll(self, first: LogRecord) -> None:
        """Seal the active segment (fsynced first) and start a new one named by ``first.seq``."""
        if self._segs.items:
            old = self._segs.items[-1]
            self._fsync(self._wfd)
            old.durable_size = old.size
            os.close(self._wfd)
            self._wfd = -1
            old.sealed = True
            self._table.stage(old)
        path = self.directory / segment_name(first.seq)
        try:
            self._wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            fsync_dir(self.directory)
        except OSError as exc:
            self._broken, self._repairable = f"cannot start segment {path.name}: {exc}", True
            raise EventLogWriteError(f"event log {self._broken}") from exc
        seg = Segment(path, first.seq, 0, first.time, first.time, 0, 0, 0, array("q"))
        self._segs.add(seg)
        self._table.stage(seg)

    def sync(self) -> None:
        """Flush and fsync; afterwards everything appended is durable and visible to readers."""
        self._check_writable()
        if not self._segs.items:
            return
        active = self._segs.items[-1]
        if active.durable_size != active.size:
            self._fsync(self._wfd)
            active.durable_size = active.size
        self._durable_seq = self._appended_seq
        if time.monotonic() >= self._metadata_due:
            self._table.stage(active)
            self._flush_metadata()

    def _flush_metadata(self) -> None:
        self._metadata_due = time.monotonic() + self._metadata_interval
        self._table.flush()  # SQL may yield to other greenlets: the state is consistent here

    def _fsync(self, fd: int) -> None:
        try:
            _fdatasync(fd)
        except OSError as exc:
            self._broken, self._repairable = f"fsync failed: {exc}", False  # the page cache may have dropped data
            raise EventLogError(f"event log fsync failed: {exc}") from exc

    def _check_writable(self) -> None:
        if self._lock_fd < 0:
            raise EventLogError("event log is not open")
        if self._broken:
            if self._repairable:
                raise EventLogWriteError(f"event log refuses writes until repaired: {self._broken}")
            raise EventLogError(f"event log refuses writes until reopened: {self._broken}")

    def repair(self) -> None:
        """After a failed write: cut the log back to its last whole record, fsync it, accept writes again.

        A segment the failed batch started and left empty is removed. Afterwards everything in
        the log is durable, and ``last_seq`` may be past the last ``sync()``: records a batch
        wrote before a segment roll (the roll fsynced them). ``EventLogWriteError`` if the
        repair fails too (try again later); ``EventLogError`` after a failed fsync, which only
        closing and opening the log (a restart) can repair. A no-op on a healthy log.
        """
        if self._broken is None:
            return
        if not self._repairable:
            raise EventLogError(f"event log cannot be repaired in place: {self._broken}")
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        segs = self._segs
        while segs.items and segs.items[-1].size == 0:  # started by the failed batch, nothing in it
            seg = segs.pop_newest()
            self._table.stage_delete(seg)
            seg.path.unlink(missing_ok=True)
        try:
            remove_stray_segments(self.directory, segs.items[-1].first_seq if segs.items else 0)
            fsync_dir(self.directory)
            if segs.items:
                active = segs.items[-1]
                self._wfd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
                os.ftruncate(self._wfd, active.size)  # a partial record a failed write left behind
        except OSError as exc:
            raise EventLogWriteError(f"event log repair failed: {exc}") from exc
        if segs.items:
            active = segs.items[-1]
            self._fsync(self._wfd)
            active.durable_size = active.size
            active.sealed = False  # active again if the failed batch had rolled past it
            self._table.stage(active)
        self._appended_seq = self._durable_seq = segs.items[-1].last_seq if segs.items else 0
        self._broken, self._repairable = None, False
        log.warning("event log repaired after a failed write last_seq=%d", self._durable_seq)

    # -- reading ---------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Highest durable seq (0 when empty)."""
        return self._durable_seq

    @property
    def first_seq(self) -> int:
        """Lowest retained seq (0 when empty)."""
        return self._segs.items[0].first_seq if self._durable_seq and self._segs.items else 0

    def read_after(self, cursor: int, max_records: int = 1000) -> list[tuple[int, bytes]]:
        """Up to ``max_records`` durable (seq, frame) with seq > ``cursor``, in order.

        A cursor older than the retained log starts at ``first_seq``; one at or past
        ``last_seq`` gets an empty list.
        """
        if self._lock_fd < 0:
            raise EventLogError("event log is not open")
        out: list[tuple[int, bytes]] = []
        self._segs.read(cursor, max_records, self._durable_seq, out, full=False)
        return out

    # -- retention and shutdown ----------------------------------------------------------------

    def prune(self, now: float | None = None) -> int:
        """Delete whole segments whose newest record is older than the retention (never the active one).

        Returns how many records were removed.
        """
        self._check_writable()
        cutoff = (time.time() if now is None else now) - self._retention_seconds
        removed = pruned = 0
        while len(self._segs.items) > 1 and self._segs.items[0].last_time < cutoff:
            seg = self._segs.items[0]
            try:
                ensure_index(seg)  # for its record count
            except EventLogError:
                log.warning("event log segment to prune is already gone segment=%s", seg.name)
            self._segs.pop_oldest()
            self._table.stage_delete(seg)
            seg.path.unlink(missing_ok=True)
            removed += seg.count or 0
            pruned += 1
            log.info("event log segment pruned segment=%s records=%d", seg.name, seg.count or 0)
        if pruned:
            fsync_dir(self.directory)
            self._flush_metadata()
        return removed

    def close(self) -> None:
        """Sync, write the metadata and release the directory; a no-op when not open."""
        if self._lock_fd < 0:
            return
        try:
            if not self._broken and self._segs.items:
                self.sync()
                self._table.stage(self._segs.items[-1])
                self._flush_metadata()
        finally:
            self._release()

    def _release(self) -> None:
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        os.close(self._lock_fd)  # closing the descriptor drops the flock
        self._lock_fd = -1
        self._segs = SegmentList([])
        self._table.clear()
        self._appended_seq = self._durable_seq = 0
        self._broken = None
