"""Where every block of an account's live slices lies: an index per slice, built by scanning its file, cached.

A slice is a CAR v1 at a byte range of a file; scanning it reads each section's length and CID
and skips the block bytes, in 1 MiB windows. An account's ``BlockIndex`` holds, sorted by key
(the last 8 bytes of the CID's digest), each block's file, offset and length in four
``array``s: 24 bytes a block, whatever the blocks' size; a look-up is one binary search.

``IndexCache`` keeps the indexes of recently read accounts (least recently used dropped first
past ``max_blocks`` entries). An index is valid for exactly the live slice ids it was built
from: slices added on top (new commits) are scanned and merged into a copy; any other change
(compaction, replace, delete) rebuilds it. Its lock is a native one: the cache is used from
gevent's thread pool and from greenlets alike (see HACKING: no gevent lock may be shared with
the pool).

``BlockReader`` reads blocks through an index with ``pread`` on files it keeps open until
``close()``; every block read is hash-checked against its full CID (a key clash fails there).
An open file stays readable after a compaction unlinks it, so a reader that opened its files
serves one consistent snapshot.
"""

from __future__ import annotations

import heapq
import os
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

from protocol.car import cid_length
from protocol.cid import SUPPORTED_PREFIXES, cid_to_str, read_varint, verify_block
from protocol.errors import BlockHashMismatch
from store.carstore_schema import CarStoreError, SliceRow
from store.db import native_lock

WINDOW_BYTES = 1 << 20  # bytes read at a time while scanning a slice
SORT_RUN = 16_384  # entries sorted at once (then merged): bounds the sort's temporary Python objects
MAX_CACHED_BLOCKS = 1_000_000  # index entries kept across reads (all accounts), 24 bytes each
_SECTION_HEAD = 64  # a section's length varint and CID fit in this many bytes
_CID_LEN = 36

Location = tuple[int, int, int]  # file number, offset of the block bytes, their length


def block_key(cid: bytes) -> int:
    """A CID's index key: the last 8 bytes of its digest (a clash is caught by the read's hash check)."""
    return int.from_bytes(cid[-8:], "big")


@dataclass(frozen=True, slots=True)
class BlockIndex:
    """The blocks of one set of live slices (``slice_ids``, oldest first): keys sorted, then where each lies.

    Among equal keys the newest slice's block comes first (a block in several slices has the
    same bytes in each; the newest file is the likeliest to stay).
    """

    slice_ids: tuple[int, ...]
    paths: tuple[str, ...]  # file number -> path under the slices root
    keys: array[int]
    files: array[int]
    offsets: array[int]
    lengths: array[int]

    def find(self, cid: bytes) -> Location | None:
        key = block_key(cid)
        keys = self.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return self.files[i], self.offsets[i], self.lengths[i]
        return None

    def __len__(self) -> int:
        return len(self.keys)


def scan_slice(root: str, row: SliceRow, file_no: int, out: tuple[array[int], ...]) -> None:
    """Append slice ``row``'s blocks to ``out`` (keys, files, offsets, lengths); ``FileNotFoundError`` if gone."""
    keys, files, offsets, lengths = out
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
            cid_len = _CID_LEN if buf[j : j + 4] in SUPPORTED_PREFIXES else cid_length(buf, j)
            if length <= cid_len or buf_at + j + length > end:
                raise CarStoreError(f"slice file {row.path} has a bad section at byte {pos}")
            keys.append(int.from_bytes(buf[j + cid_len - 8 : j + cid_len], "big"))
            files.append(file_no)
            offsets.append(buf_at + j + cid_len)
            lengths.append(length - cid_len)
            pos = buf_at + j + length
    finally:
        os.close(fd)


def build_index(root: str, rows: Sequence[SliceRow], base: BlockIndex | None = None) -> BlockIndex:
    """The index of ``rows`` (oldest first); with ``base`` (the index of a prefix of them) only the rest is scanned."""
    paths = list(base.paths) if base else []
    numbers = {p: n for n, p in enumerate(paths)}
    out = (array("Q"), array("H"), array("Q"), array("I"))
    for row in reversed(rows[len(base.slice_ids) if base else 0 :]):  # newest first
        if row.path not in numbers:
            numbers[row.path] = len(paths)
            paths.append(row.path)
        scan_slice(root, row, numbers[row.path], out)
    if base:  # older than everything scanned: after it (the sort is stable); two sorted runs merge fast
        for part, old in zip(out, (base.keys, base.files, base.offsets, base.lengths), strict=True):
            part.extend(old)
    return BlockIndex(tuple(r.id for r in rows), tuple(paths), *_sorted_columns(out))


def sorted_runs(keys: array[int]) -> list[array[int]]:
    """``keys`` as sorted runs of at most ``SORT_RUN`` (a sort's Python objects exist for one run at a time)."""
    return [array("Q", sorted(keys[i : i + SORT_RUN])) for i in range(0, len(keys), SORT_RUN)]


def _sorted_columns(columns: tuple[array[int], ...]) -> tuple[array[int], ...]:
    """The columns (keys first) ordered by key, stable; sorted in runs, then merged one row at a time.

    The columns given are emptied (they are scratch space).
    """
    keys = columns[0]
    runs = []
    for start in range(0, len(keys), SORT_RUN):
        order = sorted(range(start, min(len(keys), start + SORT_RUN)), key=keys.__getitem__)
        runs.append(tuple(array(col.typecode, (col[i] for i in order)) for col in columns))
    for col in columns:  # the caller's scratch columns: free them before the merge
        del col[:]
    if len(runs) == 1:
        return runs[0]
    out = tuple(array(col.typecode) for col in columns)
    appends = [col.append for col in out]
    for row in heapq.merge(*(zip(*run, strict=True) for run in runs), key=itemgetter(0)):  # ties: earlier run first
        for append, value in zip(appends, row, strict=True):
            append(value)
    return out


class IndexCache:
    """Block indexes of recently read accounts, at most ``max_blocks`` entries in all (least recently used go)."""

    def __init__(self, max_blocks: int = MAX_CACHED_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._lock = native_lock()
        self._indexes: OrderedDict[str, BlockIndex] = OrderedDict()
        self._size = 0

    def index(self, root: str, did: str, rows: Sequence[SliceRow]) -> BlockIndex:
        """The index of ``did``'s live slices ``rows``: cached, extended by the slices added on top, or built."""
        ids = tuple(r.id for r in rows)
        with self._lock:
            cached = self._indexes.get(did)
            if cached is not None:
                self._indexes.move_to_end(did)
        if cached is not None and cached.slice_ids == ids:
            return cached
        on_top = cached is not None and ids[: len(cached.slice_ids)] == cached.slice_ids
        index = build_index(root, rows, cached if on_top else None)
        with self._lock:
            old = self._indexes.pop(did, None)
            self._size -= len(old) if old is not None else 0
            if len(index) <= self.max_blocks:  # a bigger one serves this read only
                self._indexes[did] = index
                self._size += len(index)
            while self._size > self.max_blocks:
                _, gone = self._indexes.popitem(last=False)
                self._size -= len(gone)
        return index


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
        where = self.index.find(cid)
        if where is None:
            raise KeyError(cid)
        data = self.read(cid, where)
        if kept is not None:
            kept[cid] = data
        return data

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, bytes) and self.index.find(cid) is not None

    def __iter__(self) -> Iterator[bytes]:
        raise TypeError("the blocks of an index are looked up, not listed")

    def __len__(self) -> int:
        return len(self.index.keys)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
