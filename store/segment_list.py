"""The ordered segments of an event log, and reads across them from a cursor.

A read finds its first segment by bisecting the segments' first seqs, then its place in the
segment from the sparse index (or, for a cursor a recent read ended at, from a small cache of
where that read stopped), and reads forward in large chunks, never past a segment's durable
size nor past the seq the caller says is durable.
"""

from __future__ import annotations

import os
from bisect import bisect_right

from store.log_recovery import ensure_index
from store.segments import Segment, read_records

RESUME_ENTRIES = 1024  # cursors remembered with the (segment, offset) just after them


class SegmentList:
    """Segments in seq order (the last one is the active one); ``items`` is read-only for callers."""

    def __init__(self, segments: list[Segment]) -> None:
        self.items = segments
        self._first_seqs = [s.first_seq for s in segments]
        self._resume: dict[int, tuple[Segment, int]] = {}

    def add(self, seg: Segment) -> None:
        self.items.append(seg)
        self._first_seqs.append(seg.first_seq)

    def pop_oldest(self) -> Segment:
        seg = self.items.pop(0)
        del self._first_seqs[0]
        seg.deleted = True
        return seg

    def pop_newest(self) -> Segment:
        seg = self.items.pop()
        del self._first_seqs[-1]
        seg.deleted = True
        return seg

    def read(self, cursor: int, limit: int, max_seq: int, out: list, full: bool) -> None:
        """Append to ``out`` up to ``limit`` records with ``cursor < seq <= max_seq``, in order.

        Items are (seq, frame), or ``LogRecord`` when ``full``. A cursor before the first
        segment starts at the first record.
        """
        if cursor >= max_seq or limit <= 0 or not self.items:
            return
        segments = self.items
        hit = self._resume.get(cursor)
        skip = 0
        if hit is not None and not hit[0].deleted:
            seg, offset = hit
            i = bisect_right(self._first_seqs, seg.first_seq) - 1
        else:
            i = max(bisect_right(self._first_seqs, cursor) - 1, 0)
            seg = segments[i]
            ensure_index(seg)
            anchor, offset = seg.indexed_at_or_before(cursor)
            skip = cursor - anchor  # about how many records to pass over before the first one wanted
        while True:
            ensure_index(seg)
            if offset < seg.durable_size and seg.last_seq > cursor:
                hint = (skip + limit - len(out)) * (seg.size // seg.count) if seg.count else 0
                fd = os.open(seg.path, os.O_RDONLY)
                try:
                    offset, stop = read_records(fd, offset, seg.durable_size, cursor, max_seq, limit, out, full, hint)
                finally:
                    os.close(fd)
                if stop:
                    break
            i += 1
            if i >= len(segments):
                break
            seg, offset, skip = segments[i], 0, 0
        if out:
            if len(self._resume) >= RESUME_ENTRIES:
                del self._resume[next(iter(self._resume))]
            self._resume[out[-1].seq if full else out[-1][0]] = (seg, offset)
