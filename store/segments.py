"""Event log segment files: the record framing, crc-checked scanning and fast chunked reads.

A segment is an append-only file holding records with strictly increasing seqs, named by the
seq of its first record, zero-padded so names sort (``00000000000000000042.seg``). A record is
a fixed 44-byte little-endian header followed by the frame bytes::

    magic u32 | length u32 | crc32 u32 | seq i64 | time f64 | host_id i64 | upstream_seq i64 | frame

``length`` counts the frame bytes only (at most ``MAX_FRAME_BYTES``); ``crc32`` covers the 32
header bytes after it and the frame. A torn write leaves a short or crc-failing record at the
end of a file: ``scan_segment`` finds the end of the good prefix. No SQL and no locking here;
``store.eventlog`` owns the files, their metadata and who may read how far.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from store.db import StoreError

MAGIC = int.from_bytes(b"SRL1", "little")
HEADER = struct.Struct("<IIIqdqq")  # magic, length, crc32, seq, time, host_id, upstream_seq
HEADER_SIZE = HEADER.size  # 44
PREFIX = struct.Struct("<III")  # magic, length, crc32
BODY = struct.Struct("<qdqq")  # seq, time, host_id, upstream_seq (the crc covers these and the frame)
MAX_FRAME_BYTES = 16 * 2**20
INDEX_EVERY = 64  # one sparse index entry (seq, offset) per this many records: 8 KiB per 64 MiB of 2 KB frames
FIRST_READ_BYTES = 64 * 2**10  # reads start small (a seek, a live tail) and double ...
READ_CHUNK_BYTES = 2 * 2**20  # ... up to this (a replay)
SCAN_CHUNK_BYTES = 4 * 2**20
SUFFIX = ".seg"
_NAME = re.compile(r"^(\d{20})\.seg$")


class EventLogError(StoreError):
    """The event log cannot be opened or used: locked, corrupt beyond repair, or failed I/O."""


class EventLogWriteError(EventLogError):
    """A write failed (disk full, for example) and ``EventLog.repair()`` may make the log writable again."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    seq: int  # relay seq, strictly increasing, assigned by the caller
    time: float  # unix time the relay accepted it
    host_id: int  # upstream host id (0 if none)
    upstream_seq: int  # the event's seq on its upstream host (-1 if none)
    frame: bytes  # the complete output websocket frame (header+body DAG-CBOR)


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first seq a segment file name stands for, or None for any other file."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


@dataclass(slots=True, eq=False)
class Segment:
    """In-memory state of one segment file. ``count`` and the index are None until scanned."""

    path: Path
    first_seq: int
    last_seq: int  # of the last record written (0 while empty)
    first_time: float
    last_time: float
    size: int  # bytes written (may be ahead of what is on disk for sure)
    durable_size: int  # bytes known to be fsynced: readers never read past this
    count: int | None
    index_seqs: array[int] | None = None  # every INDEX_EVERY-th record's seq ...
    index_offsets: array[int] = field(default_factory=lambda: array("q"))  # ... and its offset
    sealed: bool = False  # no more appends: a newer segment exists
    deleted: bool = False  # pruned

    @property
    def name(self) -> str:
        return self.path.name

    def indexed_at_or_before(self, seq: int) -> tuple[int, int]:
        """(seq, offset) of the last indexed record with a seq <= ``seq``, or of the first record."""
        assert self.index_seqs is not None
        i = bisect_right(self.index_seqs, seq) - 1
        return (self.index_seqs[i], self.index_offsets[i]) if i >= 0 else (self.first_seq, 0)


@dataclass(slots=True)
class ScanResult:
    good_size: int  # bytes of the good prefix
    count: int
    last_seq: int  # 0 when no good record
    first_seq: int
    first_time: float
    last_time: float
    index_seqs: array[int]
    index_offsets: array[int]
    problem: str | None  # why the scan stopped before the end of the file, None if it did not


def scan_segment(fd: int, file_size: int, prev_seq: int) -> ScanResult:
    """Walk a segment from offset 0, checking framing, crc and that seqs increase past ``prev_seq``.

    Stops at the first record that is short (torn), has a bad magic or length, fails its crc
    or does not increase the seq; everything before it is the good prefix.
    """
    res = ScanResult(0, 0, 0, 0, 0.0, 0.0, array("q"), array("q"), None)
    buf = b""
    base = 0  # file offset of buf[0]
    pos = 0
    last = prev_seq
    while True:
        if pos + HEADER_SIZE > len(buf):
            buf, base, pos = _refill(fd, buf, base, pos, SCAN_CHUNK_BYTES, file_size)
            if pos + HEADER_SIZE > len(buf):
                if base + pos < file_size:
                    res.problem = "torn header"
                return res
        magic, length, crc, seq, at, _host, _up = HEADER.unpack_from(buf, pos)
        if magic != MAGIC or length > MAX_FRAME_BYTES:
            res.problem = "bad magic or length"
            return res
        end = pos + HEADER_SIZE + length
        if end > len(buf):
            buf, base, pos = _refill(fd, buf, base, pos, max(SCAN_CHUNK_BYTES, HEADER_SIZE + length), file_size)
            end = pos + HEADER_SIZE + length
            if end > len(buf):
                res.problem = "torn record"
                return res
        if zlib.crc32(memoryview(buf)[pos + 12 : end]) != crc:
            res.problem = "crc mismatch"
            return res
        if seq <= last:
            res.problem = f"seq {seq} does not increase past {last}"
            return res
        if res.count % INDEX_EVERY == 0:
            res.index_seqs.append(seq)
            res.index_offsets.append(base + pos)
        if res.count == 0:
            res.first_seq, res.first_time = seq, at
        res.count += 1
        res.last_seq, res.last_time = seq, at
        last = seq
        pos = end
        res.good_size = base + pos


def _refill(fd: int, buf: bytes, base: int, pos: int, want: int, file_size: int) -> tuple[bytes, int, int]:
    """Drop consumed bytes and read up to ``want`` more; returns (buf, base, pos=0)."""
    keep = buf[pos:]
    start = base + pos + len(keep)
    more = os.pread(fd, max(0, min(want, file_size - start)), start) if start < file_size else b""
    return keep + more, base + pos, 0


def encode_run(records: Sequence[LogRecord], offset: int, count: int) -> tuple[bytes, list[int], list[int]]:
    """Encode records to be written at ``offset`` of a segment already holding ``count`` records.

    Returns the bytes and the new sparse index entries (seqs, offsets) they add.
    """
    parts: list[bytes] = []
    add = parts.append
    seqs: list[int] = []
    offsets: list[int] = []
    pack_body = BODY.pack
    pack_prefix = PREFIX.pack
    crc32 = zlib.crc32
    for rec in records:
        frame = rec.frame
        body = pack_body(rec.seq, rec.time, rec.host_id, rec.upstream_seq)
        if count % INDEX_EVERY == 0:
            seqs.append(rec.seq)
            offsets.append(offset)
        add(pack_prefix(MAGIC, len(frame), crc32(frame, crc32(body))))
        add(body)
        add(frame)
        offset += HEADER_SIZE + len(frame)
        count += 1
    return b"".join(parts), seqs, offsets


def read_records(
    fd: int,
    start: int,
    end: int,
    after_seq: int,
    max_seq: int,
    limit: int,
    out: list,  # list[tuple[int, bytes]] or list[LogRecord]
    full: bool,
    first_read: int = FIRST_READ_BYTES,
) -> tuple[int, bool]:
    """Append to ``out`` the records in ``[start, end)`` with ``after_seq < seq <= max_seq``.

    ``start`` must be a record boundary. Stops once ``out`` holds ``limit`` records or a seq
    passes ``max_seq``. Returns (offset after the last record consumed, whether to stop).
    Items are ``(seq, frame)``, or ``LogRecord`` when ``full``. Records are trusted to have
    been crc-checked when written or scanned; framing is still checked. Reads start with
    ``first_read`` bytes (clamped to 64 KiB-2 MiB) and double.
    """
    off = start
    chunk = min(max(first_read, FIRST_READ_BYTES), READ_CHUNK_BYTES)
    want = chunk
    unpack = HEADER.unpack_from
    while off < end:
        buf = os.pread(fd, min(want, end - off), off)
        n = len(buf)
        if n < min(want, end - off):
            raise EventLogError(f"segment file is shorter than its durable size ({off + n} < {end})")
        pos = 0
        length = 0
        while pos + HEADER_SIZE <= n:
            magic, length, _crc, seq, at, host, up = unpack(buf, pos)
            if magic != MAGIC or length > MAX_FRAME_BYTES:
                raise EventLogError(f"corrupt record header at offset {off + pos} of a segment")
            rec_end = pos + HEADER_SIZE + length
            if rec_end > n:
                break
            if seq > max_seq:
                return off + pos, True
            if seq > after_seq:
                frame = buf[pos + HEADER_SIZE : rec_end]
                out.append(LogRecord(seq, at, host, up, frame) if full else (seq, frame))
                if len(out) >= limit:
                    return off + rec_end, True
            pos = rec_end
        if pos == 0:
            need = HEADER_SIZE + length if n >= HEADER_SIZE else HEADER_SIZE
            if n < need and off + n >= end:
                raise EventLogError(f"segment ends inside a record at offset {off}")
            want = max(chunk, need)
            continue
        off += pos
        chunk = min(2 * chunk, READ_CHUNK_BYTES)
        want = chunk
    return off, False
