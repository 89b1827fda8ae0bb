"""Event log recovery at open: find segment files, cut torn or corrupt tails, index sealed ones lazily.

The files are the truth. The newest segment is always scanned (crc, framing, increasing seqs)
and cut after its last good record; an older one is trusted without reading it when its
``log_segment`` row is sealed and has the file's exact size, else it is scanned the same way.
A file left with no good record is removed. Trusted segments get their sparse index (and a
crc check) from ``ensure_index`` the first time they are read. ``tail_cursors`` turns the log
tail into each host's upstream cursor.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from store.segment_table import SegmentRow
from store.segments import EventLogError, LogRecord, Segment, parse_segment_name, scan_segment

log = logging.getLogger(__name__)


def lock_directory(directory: Path) -> int:
    """Hold an exclusive ``flock`` on ``directory/LOCK``; the descriptor, closing it releases."""
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EventLogError(f"event log directory {directory} is in use by another writer") from None
    return fd


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stray_segments(directory: Path, after_seq: int) -> int:
    """Delete empty segment files named past ``after_seq`` (a roll that failed half-way); how many."""
    removed = 0
    for name in os.listdir(directory):
        seq = parse_segment_name(name)
        if seq is not None and seq > after_seq and (directory / name).stat().st_size == 0:
            (directory / name).unlink()
            removed += 1
    return removed


def recover_segments(directory: Path, rows: dict[str, SegmentRow]) -> tuple[list[Segment], int]:
    """The segments in ``directory`` in seq order after repair, and how many bytes were cut."""
    files = sorted((seq, name) for name in os.listdir(directory) if (seq := parse_segment_name(name)) is not None)
    truncated = 0
    segments: list[Segment] = []
    for i, (first, name) in enumerate(files):
        path = directory / name
        prev_last = segments[-1].last_seq if segments else 0
        if first <= prev_last:
            raise EventLogError(f"segment {name} overlaps the previous one (which ends at seq {prev_last})")
        size = path.stat().st_size
        row = rows.get(name)
        newest = i == len(files) - 1
        if not newest and row and row.sealed and row.byte_size == size and first <= row.last_seq:
            segments.append(Segment(path, first, row.last_seq, row.first_time, row.last_time, size, size, None))
            continue
        seg, cut = repair_segment(path, first, size, newest)
        truncated += cut
        if seg is not None:
            segments.append(seg)
    if segments and segments[-1].count is None:  # the newest file was empty: the one before is active
        last = segments.pop()
        seg, cut = repair_segment(last.path, last.first_seq, last.size, True)
        truncated += cut
        if seg is not None:
            segments.append(seg)
    for seg in segments[:-1]:
        seg.sealed = True
    return segments, truncated


def repair_segment(path: Path, first: int, size: int, newest: bool) -> tuple[Segment | None, int]:
    """Scan a segment, cut what follows its last good record and fsync it; None if nothing is left."""
    fd = os.open(path, os.O_RDWR)
    try:
        res = scan_segment(fd, size, first - 1)
        if res.count and res.first_seq != first:
            raise EventLogError(f"segment {path.name} starts at seq {res.first_seq}")
        cut = size - res.good_size
        if cut:
            (log.warning if newest else log.error)(
                "event log segment truncated segment=%s offset=%d removed_bytes=%d reason=%r",
                path.name,
                res.good_size,
                cut,
                res.problem,
            )
            os.ftruncate(fd, res.good_size)
        os.fsync(fd)  # what survived a process crash may still be only in the page cache
    finally:
        os.close(fd)
    if res.count == 0:
        path.unlink()
        fsync_dir(path.parent)
        log.warning("event log removed empty segment=%s", path.name)
        return None, cut
    seg = Segment(path, first, res.last_seq, res.first_time, res.last_time, res.good_size, res.good_size, res.count)
    seg.index_seqs, seg.index_offsets = res.index_seqs, res.index_offsets
    return seg, cut


def ensure_index(seg: Segment) -> None:
    """Build a trusted segment's sparse index and record count, crc-checking it, on first use.

    A corrupt record makes reads of that segment stop before it (logged at ERROR).
    """
    if seg.index_seqs is not None:
        return
    try:
        fd = os.open(seg.path, os.O_RDONLY)
    except FileNotFoundError:
        raise EventLogError(f"event log segment file {seg.name} is missing") from None
    try:
        res = scan_segment(fd, seg.durable_size, seg.first_seq - 1)
    finally:
        os.close(fd)
    if res.good_size < seg.durable_size:
        log.error(
            "event log sealed segment corrupt segment=%s offset=%d reason=%r: reads stop there",
            seg.name,
            res.good_size,
            res.problem,
        )
        seg.size = seg.durable_size = res.good_size
        seg.last_seq, seg.last_time = res.last_seq, res.last_time
    seg.count = res.count
    seg.index_seqs, seg.index_offsets = res.index_seqs, res.index_offsets


def tail_cursors(tail: Iterable[LogRecord], saved: Mapping[int, int]) -> tuple[dict[int, int], set[int]]:
    """Each host's upstream cursor after the log ``tail``, and the hosts whose history restarted in it.

    ``saved`` is the cursor SQL holds (as of the tail's checkpoint). A host's upstream seqs only
    go up in the log, except after a ``FutureCursor`` reset (the host restarted its history): a
    record at or below the cursor before it means a reset, and from then on the last record
    counts, not the highest. So the caller must reset those hosts' saved cursors, not keep the
    old, higher one (which would skip the host's new events after a restart).
    """
    cursors: dict[int, int] = {}
    resets: set[int] = set()
    for rec in tail:
        if not rec.host_id or rec.upstream_seq < 0:
            continue
        before = cursors.get(rec.host_id, saved.get(rec.host_id, -1))
        if rec.upstream_seq <= before:
            resets.add(rec.host_id)
        cursors[rec.host_id] = rec.upstream_seq
    return cursors, resets
