"""A full repo CAR streamed from the slice files: the header first, then each block read as it is sent.

The bytes are those of ``carstore_compact.assemble_repo_car`` (canonical order, so the same
before and after compaction), in bounded memory:

- a lone compacted slice is that CAR already: its byte range is copied in chunks;
- otherwise ``open_stream`` (the first step, before any byte is sent) indexes the live slices
  (``carstore_index``: 22 bytes a block, usually cached), opens every file they are in, walks
  the MST reading the nodes only, and checks that every record it names is there: a damaged
  mirror is an error before the answer starts, and the total length is known (a
  Content-Length). Sending walks the tree again, reading each block as it comes,
  ``CHUNK_BYTES`` at a time, each hash-checked. Held: the index, 8 bytes per record during the
  measuring walk (to find records sent twice, which go once), the walk's stack; never the blocks.

Files are opened before the walk, so a compaction or replace that unlinks them meanwhile does
not disturb the stream: it sends the snapshot it started with. An account whose live slices
span more than ``MAX_OPEN_FILES`` files (a mirror far behind on compaction) is assembled in
memory instead, as before.
"""

from __future__ import annotations

import heapq
import os
from array import array
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import TYPE_CHECKING

from protocol import cbor
from protocol.car import write_car
from protocol.cid import cid_to_str, encode_varint
from protocol.commit import decode_commit
from protocol.errors import CborError, MissingBlock, MstError
from store.carstore_compact import read_live, repo_car_bytes
from store.carstore_index import BlockReader, IndexCache, Location, block_key, sorted_runs
from store.carstore_schema import KIND_COMPACTED, CarStoreError, SliceRow

if TYPE_CHECKING:
    from store.carstore import CarStore

CHUNK_BYTES = 256 * 1024  # bytes read (and handed to the socket) at a time
MAX_OPEN_FILES = 256  # files one stream may hold open; past it the CAR is assembled in memory


class RepoStream:
    """``length`` bytes handed out by ``next_chunk()`` (``b""`` at the end); ``close()`` releases the files."""

    def __init__(self, length: int, chunks: Iterator[bytes], close: Callable[[], None]) -> None:
        self.length = length
        self._chunks = chunks
        self._close = close
        self.sent = 0

    def next_chunk(self) -> bytes:
        chunk = next(self._chunks, b"")
        self.sent += len(chunk)
        return chunk

    def close(self) -> None:
        close, self._close = self._close, lambda: None
        close()


def _bytes_stream(data: bytes) -> RepoStream:
    view = memoryview(data)
    chunks = (bytes(view[i : i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES))
    return RepoStream(len(data), chunks, lambda: None)


def _file_range(path: str, offset: int, size: int) -> RepoStream:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def chunks() -> Iterator[bytes]:
        at, left = offset, size
        while left:
            part = os.pread(fd, min(CHUNK_BYTES, left), at)
            if not part:
                raise CarStoreError(f"slice file {path} ends before byte {offset + size}")
            at, left = at + len(part), left - len(part)
            yield part

    return RepoStream(size, chunks(), lambda: os.close(fd))


def _children(block: bytes) -> list[tuple[bytes | None, bool]]:
    """A node's links in canonical order: its left subtree, then each entry's record and right subtree.

    A light parse (the node's hash was just checked, and its structure when it was accepted):
    only the links' types are checked.
    """
    try:
        obj = cbor.decode(block)
        left, ents = obj["l"], obj["e"]
        out: list[tuple[bytes | None, bool]] = [(left, True)]
        for ent in ents:
            out += [(ent["v"], False), (ent["t"], True)]
    except (CborError, TypeError, KeyError):
        raise MstError("MST node in the mirror is malformed") from None
    if not all(cid is None or type(cid) is bytes for cid, _ in out):
        raise MstError("MST node in the mirror has a link that is not a CID")
    return out


def _walk(reader: BlockReader, commit_cid: bytes, dups: set[int]) -> Iterator[tuple[bytes, Location, bytes | None]]:
    """(CID, location, bytes when read) of every block the commit reaches, in canonical order.

    Reads the commit and the MST nodes only; ``MissingBlock`` for any block not in the index. A
    record whose key is in ``dups`` (records with the same CID) is yielded the first time only.
    """
    index = reader.index
    loc = index.find(commit_cid)
    if loc is None:
        raise MissingBlock(f"commit {cid_to_str(commit_cid)} is not among the blocks")
    data = reader.read(commit_cid, loc)
    yield commit_cid, loc, data
    seen: set[int] = set()
    # (cid, is an MST node): a node, its left subtree, then for each entry its record and right subtree
    stack: list[tuple[bytes | None, bool]] = [(decode_commit(data).data, True)]
    while stack:
        cid, is_node = stack.pop()
        if cid is None:
            continue
        if not is_node and dups:
            key = block_key(cid)
            if key in dups:
                if key in seen:
                    continue
                seen.add(key)
        loc = index.find(cid)
        if loc is None:
            raise MissingBlock(f"{'node' if is_node else 'record'} {cid_to_str(cid)} is not among the blocks")
        if not is_node:
            yield cid, loc, None
            continue
        data = reader.read(cid, loc)
        yield cid, loc, data
        stack.extend(reversed(_children(data)))


def _section(cid: bytes, loc: Location) -> int:
    """Bytes of a block's CAR section: length varint, CID, block."""
    return len(encode_varint(len(cid) + loc[2])) + len(cid) + loc[2]


def measure(reader: BlockReader, commit_cid: bytes) -> tuple[int, set[int]]:
    """The length of the blocks' CAR sections, and the keys of records that occur more than once.

    Held meanwhile: 8 bytes per record (their keys, sorted in runs and merged); never the blocks.
    """
    total, records = 0, array("Q")
    for cid, loc, data in _walk(reader, commit_cid, set()):
        total += _section(cid, loc)
        if data is None:
            records.append(block_key(cid))
    runs = sorted_runs(records)
    del records
    dups = {k for k, nxt in pairwise(heapq.merge(*runs)) if k == nxt}
    del runs
    if dups:  # the same record under two keys: sent once, as the in-memory assembly does
        total = sum(
            len(encode_varint(len(c) + loc[2])) + len(c) + loc[2] for c, loc, _ in _walk(reader, commit_cid, dups)
        )
    return total, dups


def _block_chunks(reader: BlockReader, header: bytes, commit_cid: bytes, dups: set[int]) -> Iterator[bytes]:
    parts, size = [header], len(header)
    for cid, loc, data in _walk(reader, commit_cid, dups):
        if data is None:
            data = reader.read(cid, loc)
        parts += (encode_varint(len(cid) + len(data)), cid, data)
        size += len(data) + len(cid) + 2
        if size >= CHUNK_BYTES:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


def open_stream(store: CarStore, cache: IndexCache, did: str) -> RepoStream | None:
    """The account's full repo CAR as a stream, or ``None`` when the mirror has no slice of it."""
    root = store._root

    def start(rows: list[SliceRow]) -> RepoStream | None:
        if not rows:
            return None
        if len(rows) == 1 and rows[0].kind == KIND_COMPACTED:
            row = rows[0]
            return _file_range(os.path.join(root, row.path), row.byte_offset, row.byte_size)
        commit = rows[-1].commit_cid
        index = cache.index(root, did, rows)
        if len(index.paths) > MAX_OPEN_FILES:
            reader = BlockReader(root, index)
            try:
                return _bytes_stream(repo_car_bytes(reader, commit))
            finally:
                reader.close()
        reader = BlockReader(root, index, keep=False)
        try:
            reader.open_all()
            length, dups = measure(reader, commit)
        except BaseException:
            reader.close()
            raise
        header = write_car([commit], [])
        return RepoStream(len(header) + length, _block_chunks(reader, header, commit, dups), reader.close)

    return read_live(store._db, did, start)
