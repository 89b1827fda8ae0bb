"""The atproto Merkle Search Tree over a block map: lookup, walk, build, edit, diff and proofs.

Every function reads nodes from ``blocks`` (CID -> block bytes, assumed already checked
against their CIDs) and raises ``MissingBlock`` when a node it needs is absent and
``MstError`` for a node or tree that breaks the format or the MST invariants (see
``protocol.mst_invert`` for the checks made on every loaded node). Keys are repo paths
(``collection/rkey``), given as ``str`` or ASCII ``bytes`` and returned as ``str``; values and
roots are binary CIDs. Node format: ``protocol.mst_node``; editing and Sync 1.1 inversion:
``protocol.mst_invert`` (both re-exported here).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import pairwise

from protocol.cid import cid_for_dag_cbor
from protocol.errors import MstError
from protocol.mst_invert import Action, MemNode, Op, OpLike, PartialTree, Ptr, invert_ops
from protocol.mst_node import (
    EMPTY_NODE_BLOCK,
    EMPTY_NODE_CID,
    Entry,
    Node,
    common_prefix_len,
    decode_node,
    encode_node,
    encode_parts,
    is_valid_key,
    is_value_link,
    key_height,
    path_key,
)

__all__ = [
    "EMPTY_NODE_CID",
    "Action",
    "Entry",
    "Node",
    "Op",
    "OpLike",
    "PartialTree",
    "apply",
    "build",
    "common_prefix_len",
    "decode_node",
    "diff",
    "encode_node",
    "get",
    "invert_ops",
    "is_valid_key",
    "key_height",
    "path_key",
    "proof_blocks",
    "walk",
]

_LO = b""
_HI = b"\xff"


def get(blocks: Mapping[bytes, bytes], root: bytes, key: str | bytes) -> bytes | None:
    """The value CID stored at ``key``, or ``None`` when the tree does not hold it."""
    k = path_key(key)
    tree = PartialTree(blocks, root)
    node = tree.root
    lo, hi = _LO, _HI
    while node is not None:
        keys = node.keys
        i = bisect_left(keys, k)
        if i < len(keys) and keys[i] == k:
            value: bytes = node.ents[i]["v"]
            return value
        gap = node.gap(i)
        if gap is None:
            return None
        lo, hi = (keys[i - 1] if i else lo), (keys[i] if i < len(keys) else hi)
        node = tree.open(gap, node.height - 1, lo, hi)
    return None


def walk(blocks: Mapping[bytes, bytes], root: bytes) -> Iterator[tuple[str, bytes]]:
    """Every (key, value CID) of the tree in key order, loading each node once."""
    tree = PartialTree(blocks, root)
    if tree.root is not None:
        yield from _walk(tree, tree.root, _LO, _HI)


def _walk(tree: PartialTree, node: MemNode, lo: bytes, hi: bytes) -> Iterator[tuple[str, bytes]]:
    keys = node.keys
    n = len(keys)
    for i in range(n + 1):
        gap = node.gap(i)
        if gap is not None:
            clo, chi = (keys[i - 1] if i else lo), (keys[i] if i < n else hi)
            yield from _walk(tree, tree.open(gap, node.height - 1, clo, chi), clo, chi)
        if i < n:
            yield keys[i].decode("ascii"), node.ents[i]["v"]


def build(
    entries: Mapping[str, bytes] | Iterable[tuple[str | bytes, bytes]],
) -> tuple[bytes, dict[bytes, bytes]]:
    """Build the canonical tree of ``entries`` from scratch: (root CID, every node block)."""
    pairs = entries.items() if isinstance(entries, Mapping) else entries
    items = sorted((path_key(k), v) for k, v in pairs)
    keys = [k for k, _ in items]
    vals = [v for _, v in items]
    for j, (key, val) in enumerate(items):
        if j and keys[j - 1] == key:
            raise MstError(f"duplicate MST key {key!r}")
        if not is_value_link(val):
            raise MstError(f"value of MST key {key!r} is not a CID link")
    if not items:
        return EMPTY_NODE_CID, {EMPTY_NODE_CID: EMPTY_NODE_BLOCK}
    heights = [key_height(k) for k in keys]
    out: dict[bytes, bytes] = {}
    root = _build(keys, vals, heights, 0, len(keys), max(heights), out)
    return root, out


def _build(
    keys: list[bytes],
    vals: list[bytes],
    heights: list[int],
    start: int,
    stop: int,
    height: int,
    out: dict[bytes, bytes],
) -> bytes:
    """The node of ``height`` over keys[start:stop] (non-empty, all of height <= ``height``)."""
    at = [j for j in range(start, stop) if heights[j] == height]
    bounds = [start - 1, *at, stop]
    subs: list[bytes | None] = []
    for a, b in pairwise(bounds):
        subs.append(_build(keys, vals, heights, a + 1, b, height - 1, out) if b > a + 1 else None)
    block = encode_parts(subs[0], [keys[j] for j in at], [vals[j] for j in at], subs[1:])
    cid = cid_for_dag_cbor(block)
    out[cid] = block
    return cid


def apply(blocks: Mapping[bytes, bytes], root: bytes, ops: Sequence[OpLike]) -> tuple[bytes, dict[bytes, bytes]]:
    """Apply ``ops`` in order; return the new root and the node blocks not already in ``blocks``.

    A create needs an absent key, an update and a delete a present one (holding ``prev`` when
    the op gives it). ``MstError`` otherwise; the tree's blocks along the edited paths are needed.
    """
    tree = PartialTree(blocks, root)
    for op in ops:
        key = path_key(op.path)
        if op.action == "create":
            tree.insert(key, _link(op.cid, op.path))
        elif op.action == "update":
            tree.update(key, _link(op.cid, op.path), op.prev)
        elif op.action == "delete":
            tree.delete(key, op.prev)
        else:
            raise MstError(f"unknown op action {op.action!r}")
    out: dict[bytes, bytes] = {}
    new_root = tree.seal(out)
    return new_root, {cid: block for cid, block in out.items() if cid not in blocks}


def _link(value: bytes | None, path: str) -> bytes:
    if not is_value_link(value):
        raise MstError(f"op on {path!r} has no valid cid")
    assert value is not None
    return value


def diff(blocks: Mapping[bytes, bytes], old_root: bytes, new_root: bytes) -> tuple[list[Op], dict[bytes, bytes]]:
    """The ops turning ``old_root`` into ``new_root`` (key order) and the node blocks new in it.

    Subtrees with the same CID in both trees are skipped, so only changed nodes are read. Ops
    carry ``prev`` for updates and deletes.
    """
    old_tree = PartialTree(blocks, old_root)
    new_tree = PartialTree(blocks, new_root)
    old_leaves: dict[bytes, bytes] = {}
    new_leaves: dict[bytes, bytes] = {}
    new_blocks: dict[bytes, bytes] = {}
    # per side: height -> {cid: (lo, hi)} of the nodes still to compare at that height
    old_levels = _start_levels(old_tree, old_root)
    new_levels = _start_levels(new_tree, new_root)
    if new_tree.root is None and old_root != new_root:
        new_blocks[EMPTY_NODE_CID] = EMPTY_NODE_BLOCK
    height = max([*old_levels, *new_levels], default=-1)
    while height >= 0:
        olds = old_levels.pop(height, {})
        news = new_levels.pop(height, {})
        for cid, (lo, hi) in olds.items():
            if cid not in news:
                _expand(old_tree, cid, height, lo, hi, old_leaves, old_levels)
        for cid, (lo, hi) in news.items():
            if cid not in olds:
                _expand(new_tree, cid, height, lo, hi, new_leaves, new_levels)
                new_blocks[cid] = blocks[cid]
        height -= 1
    ops: list[Op] = []
    for key in sorted(old_leaves.keys() | new_leaves.keys()):
        before, after = old_leaves.get(key), new_leaves.get(key)
        path = key.decode("ascii")
        if before is None:
            ops.append(Op("create", path, after))
        elif after is None:
            ops.append(Op("delete", path, None, before))
        elif before != after:
            ops.append(Op("update", path, after, before))
    return ops, new_blocks


def _start_levels(tree: PartialTree, root: bytes) -> dict[int, dict[bytes, tuple[bytes, bytes]]]:
    return {} if tree.root is None else {tree.root.height: {root: (_LO, _HI)}}


def _expand(
    tree: PartialTree,
    cid: bytes,
    height: int,
    lo: bytes,
    hi: bytes,
    leaves: dict[bytes, bytes],
    levels: dict[int, dict[bytes, tuple[bytes, bytes]]],
) -> None:
    node = tree.open(cid, height, lo, hi)
    keys = node.keys
    n = len(keys)
    below = levels.setdefault(height - 1, {})
    for i in range(n + 1):
        gap = node.gap(i)
        if gap is not None:
            assert isinstance(gap, bytes)
            below[gap] = ((keys[i - 1] if i else lo), (keys[i] if i < n else hi))
    leaves.update(zip(keys, (e["v"] for e in node.ents), strict=True))


def proof_blocks(blocks: Mapping[bytes, bytes], root: bytes, keys: Iterable[str | bytes]) -> set[bytes]:
    """The node CIDs proving each key's presence or absence, enough to invert ops on them.

    For each key: the nodes on its search path; where the key is found, also the rightmost
    spine of the subtree just left of it and the leftmost spine of the subtree just right of
    it (deleting the key merges those two, and may lift one to the top).
    """
    tree = PartialTree(blocks, root)
    out = {root}
    for path in keys:
        key = path_key(path)
        node = tree.root
        lo, hi = _LO, _HI
        while node is not None:
            nkeys = node.keys
            i = bisect_left(nkeys, key)
            n = len(nkeys)
            clo, chi = (nkeys[i - 1] if i else lo), (nkeys[i] if i < n else hi)
            if i < n and nkeys[i] == key:
                _spine(tree, node.gap(i), node.height - 1, clo, key, out, rightmost=True)
                _spine(tree, node.ents[i]["t"], node.height - 1, key, nkeys[i + 1] if i + 1 < n else hi, out)
                break
            gap = node.gap(i)
            if gap is None:
                break
            node = tree.open(gap, node.height - 1, clo, chi)
            assert node.cid is not None  # an unedited tree is all loaded blocks
            out.add(node.cid)
            lo, hi = clo, chi
    return out


def _spine(
    tree: PartialTree,
    ptr: Ptr,
    height: int,
    lo: bytes,
    hi: bytes,
    out: set[bytes],
    rightmost: bool = False,
) -> None:
    """Add the nodes from ``ptr`` down its leftmost (or rightmost) edge to ``out``."""
    while ptr is not None:
        node = tree.open(ptr, height, lo, hi)
        assert node.cid is not None  # an unedited tree is all loaded blocks
        out.add(node.cid)
        if rightmost:
            ptr = node.ents[-1]["t"] if node.keys else node.left
            lo = node.keys[-1] if node.keys else lo
        else:
            ptr = node.left
            hi = node.keys[0] if node.keys else hi
        height -= 1
