"""Where every block of an account's live slices lies: a per-account index built by scanning slice files, cached.

A slice is a CAR v1 at a byte range of a file; scanning it reads each section's length and CID
and skips the block bytes, in 1 MiB windows, so memory is the index (about 150 bytes a block)
and one window, never the slice. ``BlockIndex.where`` maps a CID to (file number, offset, length)
of its block bytes; later slices win, as in ``carstore_compact.blocks_of``.

``IndexCache`` keeps the indexes of recently read accounts (least recently used go first, at
most ``max_blocks`` entries in all). An index is valid for exactly the live slice ids it was
built from: a new slice on top extends a copy of it (only the new slices are scanned); any
other change (compaction, replace, delete) rebuilds it. Its lock is a native one: the cache is
used from gevent's thread pool and from greenlets alike (see HACKING: no gevent lock may be
shared with the pool).

``BlockReader`` reads blocks through an index with ``pread`` on files it keeps open until
``close()``; every block read is hash-checked against its CID. An open file stays readable after
a compaction unlinks it, so a reader that opened its files serves one consistent snapshot.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from protocol.cid import SUPPORTED_PREFIXES, cid_to_str, read_varint, verify_block
from protocol.errors import BlockHashMismatch
from store.carstore_schema import CarStoreError, SliceRow
from store.db import native_lock

WINDOW_BYTES = 1 << 20  # bytes read at a time while scanning a slice
MAX_CACHED_BLOCKS = 250_000  # index entries kept across reads (all accounts), about 40 MB
_SECTION_HEAD = 64  # a section's length varint and CID fit in this many bytes
_CID_LEN = 36

Location = tuple[int, int, int]  # file number, offset of the block bytes, their length


@dataclass(frozen=True, slots=True)
class BlockIndex:
    """The blocks of one set of live slices (``slice_ids``, oldest first) and where each lies."""

    slice_ids: tuple[int, ...]
    paths: tuple[str, ...]  # file number -> path under the slices root
    where: dict[bytes, Location]


def _cid_length(buf: bytes, pos: int) -> int:
    if buf[pos : pos + 4] in SUPPORTED_PREFIXES:
        return _CID_LEN
    start = pos
    for _ in range(3):
        _, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return pos - start + size


def scan_slice(root: str, row: SliceRow, file_no: int, where: dict[bytes, Location]) -> None:
    """Add every block of slice ``row`` to ``where`` (``FileNotFoundError`` when its file went away)."""
    fd = os.open(os.path.join(root, row.path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = row.byte_offset + row.byte_size
        buf_at = row.byte_offset
        buf = os.pread(fd, min(WINDOW_BYTES, row.byte_size), buf_at)
        header_len, pos = read_varint(buf, 0)
        pos = buf_at + pos + header_len
        while pos < end:
            if pos - buf_at + _SECTION_HEAD > len(buf) and buf_at + len(buf) < end:
                buf_at, buf = pos, os.pread(fd, min(WINDOW_BYTES, end - pos), pos)
            i = pos - buf_at
            length, j = read_varint(buf, i)
            cid_len = _cid_length(buf, j)
            if length <= cid_len or buf_at + j + length > end:
                raise CarStoreError(f"slice file {row.path} has a bad section at byte {pos}")
            where[buf[j : j + cid_len]] = (file_no, buf_at + j + cid_len, length - cid_len)
            pos = buf_at + j + length
    finally:
        os.close(fd)


def build_index(root: str, rows: Sequence[SliceRow], base: BlockIndex | None = None) -> BlockIndex:
    """The index of ``rows``; with ``base`` (an index of a prefix of them) only the rest is scanned."""
    paths = list(base.paths) if base else []
    numbers = {p: n for n, p in enumerate(paths)}
    where = dict(base.where) if base else {}
    for row in rows[len(base.slice_ids) if base else 0 :]:
        if row.path not in numbers:
            numbers[row.path] = len(paths)
            paths.append(row.path)
        scan_slice(root, row, numbers[row.path], where)
    return BlockIndex(tuple(r.id for r in rows), tuple(paths), where)


class IndexCache:
    """Block indexes of recently read accounts, at most ``max_blocks`` entries in all."""

    def __init__(self, max_blocks: int = MAX_CACHED_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._lock = native_lock()
        self._indexes: OrderedDict[str, BlockIndex] = OrderedDict()
        self._size = 0

    def index(self, root: str, did: str, rows: Sequence[SliceRow]) -> BlockIndex:
        """The index of ``did``'s live slices ``rows``, from the cache, extended, or built."""
        ids = tuple(r.id for r in rows)
        with self._lock:
            cached = self._indexes.get(did)
            if cached is not None:
                self._indexes.move_to_end(did)
        if cached is not None and cached.slice_ids == ids:
            return cached
        prefix = cached is not None and ids[: len(cached.slice_ids)] == cached.slice_ids
        index = build_index(root, rows, cached if prefix else None)
        self._put(did, index)
        return index

    def _put(self, did: str, index: BlockIndex) -> None:
        with self._lock:
            old = self._indexes.pop(did, None)
            if old is not None:
                self._size -= len(old.where)
            if len(index.where) > self.max_blocks:
                return  # too big to keep: built for this read only
            self._indexes[did] = index
            self._size += len(index.where)
            while self._size > self.max_blocks:
                _, gone = self._indexes.popitem(last=False)
                self._size -= len(gone.where)

    def forget(self, did: str) -> None:
        with self._lock:
            old = self._indexes.pop(did, None)
            if old is not None:
                self._size -= len(old.where)


class BlockReader(Mapping[bytes, bytes]):
    """The blocks of an index as a read-only mapping: each read from its file and hash-checked, then kept.

    ``keep=False`` keeps nothing (a stream reads each block once). Close it to close its files.
    """

    def __init__(self, root: str, index: BlockIndex, *, keep: bool = True) -> None:
        self.root = root
        self.index = index
        self._fds: dict[int, int] = {}
        self._kept: dict[bytes, bytes] | None = {} if keep else None

    def open_all(self) -> None:
        """Open every file now (``FileNotFoundError`` if one went away): later reads see this snapshot."""
        for n in range(len(self.index.paths)):
            self._fd(n)

    def _fd(self, file_no: int) -> int:
        fd = self._fds.get(file_no)
        if fd is None:
            fd = os.open(os.path.join(self.root, self.index.paths[file_no]), os.O_RDONLY | os.O_CLOEXEC)
            self._fds[file_no] = fd
        return fd

    def read(self, cid: bytes, where: Location) -> bytes:
        file_no, offset, length = where
        data = os.pread(self._fd(file_no), length, offset)
        if len(data) != length:
            raise CarStoreError(f"slice file {self.index.paths[file_no]} ends before byte {offset + length}")
        if not verify_block(cid, data):
            raise BlockHashMismatch(f"block {cid_to_str(cid)} in the mirror does not hash to its CID")
        return data

    def __getitem__(self, cid: bytes) -> bytes:
        kept = self._kept
        if kept is not None and cid in kept:
            return kept[cid]
        where = self.index.where.get(cid)
        if where is None:
            raise KeyError(cid)
        data = self.read(cid, where)
        if kept is not None:
            kept[cid] = data
        return data

    def __contains__(self, cid: object) -> bool:
        return cid in self.index.where

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.index.where)

    def __len__(self) -> int:
        return len(self.index.where)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
