"""Reading an account's slices: block loads, the repo in canonical order, the full repo CAR, compaction.

Reads list the live slice rows and read each slice's byte range of its file (a complete CAR
v1); a file removed meanwhile (a compaction, replace or delete committed between the query and
the read) makes the read start over with fresh rows, up to ``_READ_ATTEMPTS`` times (a file
missing under unchanged rows is reported at once). Every
slice parsed is hash-checked (``read_car``); a lone compacted slice asked for as a full repo
CAR is served as stored, unparsed.

Canonical order is the commit block, then the MST in pre-order: each node, then in key order
its left subtree, and for every entry the entry's record followed by the subtree to its right.
The order depends only on the repo, never on which slices the blocks came from, so a full repo
CAR is byte-for-byte the same before and after compaction (a compacted slice *is* that CAR).
A streaming reader meets every node before the nodes and records below it.

``repo_blocks`` walks with ``protocol.mst``'s strict ``PartialTree`` (node format, key order,
heights and key ranges are checked, as in ``mst.walk``) and raises ``MissingBlock`` for any
absent commit, node or record: compaction of an incomplete mirror fails and changes nothing.
It checks the commit's format, not its signature (verified when it was accepted).

``compact_account`` and ``assemble_repo_car`` are ``CarStore.compact`` and ``CarStore.repo_car``;
compaction stages its file through the store's internal helpers (same package, one owner).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import peewee

from protocol.car import read_car, write_car
from protocol.cid import cid_to_str
from protocol.commit import decode_commit
from protocol.errors import MissingBlock
from protocol.mst_invert import MemNode, PartialTree
from store import carstore_schema as q
from store.carstore_schema import KIND_COMPACTED, CarStoreError, SliceRow

if TYPE_CHECKING:
    from store.carstore import CarStore

__all__ = [
    "CompactStats",
    "assemble_repo_car",
    "blocks_of",
    "compact_account",
    "find_blocks",
    "read_live",
    "repo_blocks",
    "repo_car_bytes",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_NO_LIMIT = 1 << 40  # our own files: no block-count bound on reading them back
_READ_ATTEMPTS = 8

_LO = b""
_HI = b"\xff"


@dataclass(frozen=True, slots=True)
class CompactStats:
    """What one ``CarStore.compact`` call did.

    ``outcome``: ``compacted``; ``empty`` (no repo); ``already_compact`` (one compacted slice);
    ``conflict`` (a replace, delete or other compaction of the account won the race: nothing
    changed, the new file was discarded). Block and byte counts are per slice, so ``blocks_before``
    counts a block once per slice holding it.
    """

    did: str
    outcome: str
    slices_before: int = 0
    slices_after: int = 0
    blocks_before: int = 0
    blocks_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def compacted(self) -> bool:
        return self.outcome == "compacted"


def read_live(db: peewee.Database, did: str, read: Callable[[list[SliceRow]], T]) -> T:
    """``read(live slice rows, oldest first)``, again with fresh rows when a file went away meanwhile.

    A file is unlinked only after the supersede of its rows committed, so the rows read again
    differ; the same rows again mean a live row without its file (a damaged mirror): raised.
    """
    failed: list[SliceRow] | None = None
    for _ in range(_READ_ATTEMPTS):
        rows = q.live_slices(db, did)
        if rows == failed:
            raise CarStoreError(f"a live slice file of {did} is missing")
        try:
            return read(rows)
        except FileNotFoundError:
            failed = rows
    raise CarStoreError(f"slices of {did} kept changing while being read")


def read_slice(root: str, row: SliceRow) -> bytes:
    """The slice's bytes (``FileNotFoundError`` when its file went away: the caller retries)."""
    fd = os.open(os.path.join(root, row.path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts, offset, left = [], row.byte_offset, row.byte_size
        while left:
            part = os.pread(fd, left, offset)
            if not part:
                raise CarStoreError(f"slice file {row.path} ends before byte {row.byte_offset + row.byte_size}")
            parts.append(part)
            offset, left = offset + len(part), left - len(part)
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def blocks_of(root: str, rows: Sequence[SliceRow], since: str | None = None) -> dict[bytes, bytes]:
    """Every block of ``rows`` (with ``since``: of those with rev > ``since``), later rows winning."""
    blocks: dict[bytes, bytes] = {}
    for row in rows:
        if since is None or row.rev > since:
            blocks.update(read_car(read_slice(root, row), max_blocks=_NO_LIMIT).blocks)
    return blocks


def find_blocks(root: str, rows: Sequence[SliceRow], wanted: set[bytes]) -> dict[bytes, bytes]:
    """Those of ``wanted`` that ``rows`` hold, reading the newest slices first and stopping when all are found."""
    found: dict[bytes, bytes] = {}
    for row in reversed(rows):
        if len(found) == len(wanted):
            break
        blocks = read_car(read_slice(root, row), max_blocks=_NO_LIMIT).blocks
        found.update((cid, blocks[cid]) for cid in wanted - found.keys() if cid in blocks)
    return found


class _LostRace(Exception):
    """The slices a compaction read are no longer all live."""


def _need(blocks: Mapping[bytes, bytes], cid: bytes, what: str) -> bytes:
    try:
        return blocks[cid]
    except KeyError:
        raise MissingBlock(f"{what} {cid_to_str(cid)} is not among the blocks") from None


def repo_blocks(blocks: Mapping[bytes, bytes], commit_cid: bytes) -> dict[bytes, bytes]:
    """The commit, every MST node and every record reachable from ``commit_cid``, in canonical order."""
    commit_block = _need(blocks, commit_cid, "commit")
    data = decode_commit(commit_block).data
    out: dict[bytes, bytes] = {commit_cid: commit_block}
    tree = PartialTree(blocks, data)  # loads and checks the root (MissingBlock if absent)
    out[data] = blocks[data]
    if tree.root is not None:
        _visit(tree, tree.root, _LO, _HI, blocks, out)
    return out


def _visit(
    tree: PartialTree, node: MemNode, lo: bytes, hi: bytes, blocks: Mapping[bytes, bytes], out: dict[bytes, bytes]
) -> None:
    keys = node.keys
    n = len(keys)
    for i in range(n + 1):
        gap = node.gap(i)
        if gap is not None:
            assert isinstance(gap, bytes)  # an unedited tree holds links only
            clo, chi = (keys[i - 1] if i else lo), (keys[i] if i < n else hi)
            child = tree.open(gap, node.height - 1, clo, chi)
            out[gap] = blocks[gap]
            _visit(tree, child, clo, chi, blocks, out)
        if i < n:
            value: bytes = node.ents[i]["v"]
            if value not in out:
                out[value] = _need(blocks, value, f"record {keys[i].decode('ascii')}")


def repo_car_bytes(blocks: Mapping[bytes, bytes], commit_cid: bytes) -> bytes:
    """The full repo as a CAR v1 (root: the commit), blocks in canonical order."""
    return write_car([commit_cid], repo_blocks(blocks, commit_cid).items())


def compact_account(store: CarStore, did: str) -> CompactStats:
    """Merge ``did``'s live slices into one compacted slice file; old slices go after the metadata swap.

    Reads the slices and writes the new file outside any transaction; then, in one short
    transaction, marks exactly the slices it read superseded (all must still be live, else
    ``conflict`` and nothing changes) and records the new one. A slice written meanwhile stays
    live on top of it. ``MissingBlock`` (nothing changed) when the head's tree is incomplete.
    """
    start = time.perf_counter()
    db, root = store._db, store._root
    rows, blocks = read_live(db, did, lambda rows: (rows, blocks_of(root, rows)))
    n = len(rows)
    if not rows or (n == 1 and rows[0].kind == KIND_COMPACTED):
        return CompactStats(did, "already_compact" if n else "empty", n, n, seconds=time.perf_counter() - start)
    head = rows[-1]
    kept = repo_blocks(blocks, head.commit_cid)
    rel, data = store._new_path(did, head.rev), write_car([head.commit_cid], kept.items())
    token = store._stage(did, rel, data)
    new = SliceRow(0, did, head.rev, None, head.commit_cid, head.data_cid, rel, len(data), len(kept), KIND_COMPACTED)
    ids = [r.id for r in rows]
    try:
        with db.atomic():
            q.adjust_slice_count(db, did, 1 - n)  # the car_repo row first (see ``store.carstore``)
            if q.supersede_slices(db, ids) != n:
                raise _LostRace  # rolls the transaction back
            q.insert_slices(db, [new])
            q.delete_pending(db, token)
    except _LostRace:
        store._discard(token, [rel])
        log.info("carstore compaction lost a race did=%s", did)
        return CompactStats(did, "conflict", n, n, seconds=time.perf_counter() - start)
    store._remove([(r.id, r.path) for r in rows])
    return CompactStats(
        did,
        "compacted",
        slices_before=n,
        slices_after=1,
        blocks_before=sum(r.block_count for r in rows),
        blocks_after=len(kept),
        bytes_before=sum(r.byte_size for r in rows),
        bytes_after=len(data),
        seconds=time.perf_counter() - start,
    )


def assemble_repo_car(store: CarStore, did: str, since: str | None) -> bytes | None:
    """The repo CAR rooted at ``did``'s newest live commit, or ``None`` when the mirror has no slice.

    Without ``since``: the full repo in canonical order, byte-identical whatever the slices; a
    single compacted slice is that CAR already and is served as its file, unparsed. With
    ``since``: every block of the slices newer than ``since``, in slice order (after a
    compaction, a superset of the change). ``MissingBlock`` when a block of the repo is absent.
    """

    root = store._root

    def assemble(rows: list[SliceRow]) -> bytes | None:
        if not rows:
            return None
        commit = rows[-1].commit_cid
        if since is not None:
            return write_car([commit], blocks_of(root, rows, since).items())
        if len(rows) == 1 and rows[0].kind == KIND_COMPACTED:
            return read_slice(root, rows[0])
        return repo_car_bytes(blocks_of(root, rows), commit)

    return read_live(store._db, did, assemble)
