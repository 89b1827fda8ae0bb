"""The ``log_segment`` table: SQL metadata about event log segment files (the files stay the truth).

One event log per database: rows are keyed by the segment's file name (``path`` holds the name
relative to the log directory, so the data directory can move). Raw SQL in the database's own
paramstyle; each write is one transaction. Changes are staged and written by ``flush()``; a
database error there is logged and the changes stay staged for the next flush, since the
event log must not stop for its advisory metadata (``open()`` reconciles anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import peewee

from store.segments import Segment

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SegmentRow:
    path: str  # file name inside the log directory
    first_seq: int
    last_seq: int
    first_time: float
    last_time: float
    byte_size: int
    sealed: bool

    @classmethod
    def of(cls, seg: Segment) -> SegmentRow:
        return cls(seg.name, seg.first_seq, seg.last_seq, seg.first_time, seg.last_time, seg.size, seg.sealed)


_COLUMNS = "first_seq, last_seq, first_time, last_time, byte_size, sealed"


class SegmentTable:
    """Load, upsert and delete ``log_segment`` rows; stage changes and flush them."""

    def __init__(self, db: peewee.Database) -> None:
        self._db = db
        p = db.param
        self._select = f"SELECT path, {_COLUMNS} FROM log_segment ORDER BY first_seq"
        self._update = (
            f"UPDATE log_segment SET first_seq = {p}, last_seq = {p}, first_time = {p}, last_time = {p},"
            f" byte_size = {p}, sealed = {p} WHERE path = {p}"
        )
        self._insert = f"INSERT INTO log_segment ({_COLUMNS}, path) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})"
        self._delete = f"DELETE FROM log_segment WHERE path = {p}"
        self._staged: dict[str, Segment] = {}
        self._deleted: set[str] = set()

    def load(self) -> dict[str, SegmentRow]:
        rows = self._db.execute_sql(self._select).fetchall()
        return {
            str(r[0]): SegmentRow(str(r[0]), int(r[1]), int(r[2]), float(r[3]), float(r[4]), int(r[5]), bool(r[6]))
            for r in rows
        }

    def reconcile(self, rows: dict[str, SegmentRow], segments: Iterable[Segment]) -> None:
        """Make the table, which held ``rows``, describe exactly ``segments``; drop anything staged."""
        current = {seg.name: SegmentRow.of(seg) for seg in segments}
        self._staged.clear()
        self._deleted.clear()
        self.write([r for name, r in current.items() if rows.get(name) != r], [n for n in rows if n not in current])

    def write(self, rows: Iterable[SegmentRow], deleted: Iterable[str] = ()) -> None:
        """Delete the rows named in ``deleted``, then update or insert each of ``rows``."""
        with self._db.atomic():
            for name in deleted:
                self._db.execute_sql(self._delete, (name,))
            for row in rows:
                p = (row.first_seq, row.last_seq, row.first_time, row.last_time, row.byte_size, row.sealed, row.path)
                if self._db.execute_sql(self._update, p).rowcount == 0:
                    self._db.execute_sql(self._insert, p)

    def stage(self, seg: Segment) -> None:
        """Write this segment's row (as it is at the time of the flush) at the next flush."""
        self._staged[seg.name] = seg

    def stage_delete(self, seg: Segment) -> None:
        self._staged.pop(seg.name, None)
        self._deleted.add(seg.name)

    def flush(self) -> None:
        """Write the staged changes; on a database error keep them for the next flush."""
        staged, self._staged = self._staged, {}
        deleted, self._deleted = self._deleted, set()
        if not staged and not deleted:
            return
        try:
            self.write([SegmentRow.of(s) for s in staged.values() if not s.deleted], deleted)
        except (peewee.DatabaseError, peewee.InterfaceError) as exc:  # InterfaceError: a connection gone
            log.warning("event log metadata update failed error=%s: retried at the next flush", type(exc).__name__)
            for name, seg in staged.items():
                self._staged.setdefault(name, seg)
            self._deleted |= deleted - self._staged.keys()

    def clear(self) -> None:
        self._staged.clear()
        self._deleted.clear()
