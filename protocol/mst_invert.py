"""Editing an MST in memory over a partial block map, and Sync 1.1 operation inversion on it.

``PartialTree`` loads only the nodes an edit touches, keeps edited nodes in memory (editing
libipld's decoded entry maps in place, so unchanged entries are re-encoded as they are) and
hashes them once, at ``seal``. Every edit leaves the exact
canonical MST, so the resulting root does not depend on the order of edits. ``invert_ops``
undoes a commit's operations on the commit's new tree and returns the root it arrives at, for
the caller to compare with the event's ``prevData``.

Checked for every node loaded: everything ``mst_node.parse_node`` checks (in strict mode, the
default, including every key's syntax and height), its height equal to its parent's minus one,
keys inside the range the parent gives the node, no empty nodes below the root, no subtrees at
height 0, a root that is not a bare pointer. Not checked: nodes that are not loaded (unchanged
subtrees are kept by CID), and that a block hashes to its CID (the CAR reader does that).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from protocol import cbor
from protocol.cid import cid_for_dag_cbor, cid_to_str
from protocol.errors import MissingBlock, MstError
from protocol.mst_node import (
    EMPTY_NODE_BLOCK,
    EMPTY_NODE_CID,
    ParsedNode,
    is_value_link,
    key_height,
    make_entry,
    parse_node,
    path_key,
)

Action = Literal["create", "update", "delete"]
_LO = b""  # below every key
_HI = b"\xff"  # above every key (keys are ASCII)


@dataclass(frozen=True, slots=True)
class Op:
    """One record operation of a commit: ``cid`` is the new value, ``prev`` the old one."""

    action: Action
    path: str
    cid: bytes | None
    prev: bytes | None = None


class OpLike(Protocol):
    """Anything shaped like ``Op`` (the firehose parser's own op type included)."""

    @property
    def action(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def cid(self) -> bytes | None: ...
    @property
    def prev(self) -> bytes | None: ...


class MemNode:
    """A node in memory: ``ents`` are entry maps as encoded (``t`` may hold a ``MemNode``).

    ``cid`` is set while the node still equals the block it was loaded from.
    """

    __slots__ = ("cid", "ents", "height", "keys", "left")

    def __init__(
        self, height: int, left: Ptr, keys: list[bytes], ents: list[dict[str, Any]], cid: bytes | None = None
    ) -> None:
        self.height = height
        self.left = left
        self.keys = keys
        self.ents = ents
        self.cid = cid

    def gap(self, i: int) -> Ptr:
        """The subtree between keys ``i - 1`` and ``i`` (``left`` for i = 0)."""
        return self.ents[i - 1]["t"] if i else self.left

    def set_gap(self, i: int, ptr: Ptr) -> None:
        if i:
            self.ents[i - 1]["t"] = ptr
        else:
            self.left = ptr


Ptr = bytes | MemNode | None  # a subtree: by CID (not loaded), in memory, or absent


def _rekey(keys: list[bytes], ents: list[dict[str, Any]], j: int) -> None:
    """Redo the prefix compression of entry ``j`` after its predecessor changed."""
    old = ents[j]
    ents[j] = make_entry(keys[j - 1] if j else b"", keys[j], old["v"], old["t"])


def _chain(key: bytes, height: int, val: bytes, level: int) -> MemNode:
    """A fresh subtree at ``level`` holding only ``key`` (empty nodes down to its height)."""
    node = MemNode(height, None, [key], [make_entry(b"", key, val, None)])
    for lvl in range(height + 1, level + 1):
        node = MemNode(lvl, node, [], [])
    return node


class PartialTree:
    """An MST rooted at ``root`` over ``blocks``; missing nodes raise ``MissingBlock`` when needed.

    After an edit raised, the tree is in an undefined state: drop it.
    """

    __slots__ = ("_blocks", "_parsed", "_strict", "_taken", "root")

    def __init__(self, blocks: Mapping[bytes, bytes], root: bytes, strict: bool = True) -> None:
        self._blocks = blocks
        self._strict = strict
        self._parsed: dict[bytes, ParsedNode] = {}
        self._taken: set[bytes] = set()
        if type(root) is not bytes:
            raise MstError("MST root is not a CID")
        left, _, _, height = self._parse(root)
        if height is None and left is not None:
            raise MstError("MST root is an empty node pointing to a subtree")
        self.root: MemNode | None = None if height is None else self.open(root, height, _LO, _HI)

    def _parse(self, cid: bytes) -> ParsedNode:
        hit = self._parsed.get(cid)
        if hit is None:
            try:
                block = self._blocks[cid]
            except KeyError:
                raise MissingBlock(f"MST node {cid_to_str(cid)} is not among the blocks") from None
            hit = self._parsed[cid] = parse_node(block, self._strict)
        return hit

    def open(self, ptr: bytes | MemNode, height: int, lo: bytes, hi: bytes) -> MemNode:
        """The node behind ``ptr``, loaded as a node of ``height`` with keys in (lo, hi)."""
        if type(ptr) is MemNode:
            return ptr
        assert isinstance(ptr, bytes)
        if ptr in self._taken:  # entry maps are edited in place: another copy needs a fresh parse
            left, keys, ents, own = parse_node(self._blocks[ptr], self._strict)
        else:
            self._taken.add(ptr)
            left, keys, ents, own = self._parse(ptr)
        if own is None:
            if left is None or height <= 0:
                raise MstError("empty MST node below the root")
        elif own != height:
            raise MstError(f"MST node of height {own} found at height {height}")
        elif keys[0] <= lo or keys[-1] >= hi:
            raise MstError("MST node keys outside the range of their parent")
        return MemNode(height, left, keys, ents, ptr)

    # -- edits ---------------------------------------------------------------------------

    def insert(self, key: bytes, val: bytes) -> None:
        """Add ``key`` (valid, absent) with value ``val``; ``MstError`` if it is present."""
        height = key_height(key)
        root = self.root
        if root is None:
            self.root = _chain(key, height, val, height)
        elif height <= root.height:
            self._insert(root, key, height, val, _LO, _HI)
        else:
            left, right = self._split(root, key, _LO, _HI)
            for lvl in range(root.height + 1, height):
                left = MemNode(lvl, left, [], []) if left is not None else None
                right = MemNode(lvl, right, [], []) if right is not None else None
            self.root = MemNode(height, left, [key], [make_entry(b"", key, val, right)])

    def _insert(self, node: MemNode, key: bytes, height: int, val: bytes, lo: bytes, hi: bytes) -> None:
        keys = node.keys
        i = bisect_left(keys, key)
        n = len(keys)
        if i < n and keys[i] == key:
            raise MstError(f"MST key {key!r} is already present")
        node.cid = None
        clo = keys[i - 1] if i else lo
        chi = keys[i] if i < n else hi
        gap = node.gap(i)
        child: MemNode | None
        if height == node.height:
            right = None
            if gap is not None:
                child, right = self._split(self.open(gap, height - 1, clo, chi), key, clo, chi)
                node.set_gap(i, child)
            keys.insert(i, key)
            node.ents.insert(i, make_entry(clo if i else b"", key, val, right))
            if i < n:
                _rekey(keys, node.ents, i + 1)
            return
        if gap is None:
            child = _chain(key, height, val, node.height - 1)
        else:
            child = self.open(gap, node.height - 1, clo, chi)
            self._insert(child, key, height, val, clo, chi)
        node.set_gap(i, child)

    def _split(self, node: MemNode, key: bytes, lo: bytes, hi: bytes) -> tuple[MemNode | None, MemNode | None]:
        """Cut ``node`` (which must not hold ``key``) into the parts below and above ``key``."""
        keys = node.keys
        i = bisect_left(keys, key)
        n = len(keys)
        if i < n and keys[i] == key:  # only in a tree with keys at wrong heights
            raise MstError(f"MST key {key!r} is already present")
        gap = node.gap(i)
        clo = keys[i - 1] if i else lo
        chi = keys[i] if i < n else hi
        right = MemNode(node.height, None, keys[i:], node.ents[i:])
        del keys[i:], node.ents[i:]
        if i and i < n:
            _rekey(right.keys, right.ents, 0)
        node.cid = None
        if gap is not None:
            below, above = self._split(self.open(gap, node.height - 1, clo, chi), key, clo, chi)
            node.set_gap(i, below)
            right.left = above
        return (
            node if keys or node.left is not None else None,
            right if right.keys or right.left is not None else None,
        )

    def delete(self, key: bytes, expected: bytes | None = None) -> bytes:
        """Remove ``key`` and return its value; ``MstError`` if absent or not ``expected``."""
        if self.root is None:
            raise MstError(f"MST key {key!r} is not present (empty tree)")
        old, root = self._delete(self.root, key, expected, _LO, _HI)
        while root is not None and not root.keys:  # the top may not be a bare pointer
            assert root.left is not None
            root = self.open(root.left, root.height - 1, _LO, _HI)
        self.root = root
        return old

    def _delete(
        self, node: MemNode, key: bytes, expected: bytes | None, lo: bytes, hi: bytes
    ) -> tuple[bytes, MemNode | None]:
        keys = node.keys
        ents = node.ents
        i = bisect_left(keys, key)
        n = len(keys)
        clo = keys[i - 1] if i else lo
        if i < n and keys[i] == key:
            old = ents[i]["v"]
            if expected is not None and old != expected:
                raise MstError(f"MST key {key!r} does not have the expected value")
            if key_height(key) != node.height:
                raise MstError(f"MST key {key!r} is in a node of the wrong height")
            chi = keys[i + 1] if i + 1 < n else hi
            merged = self._merge(node.gap(i), ents[i]["t"], node.height - 1, clo, key, chi)
            del keys[i], ents[i]
            if i < n - 1:
                _rekey(keys, ents, i)
        else:
            gap = node.gap(i)
            if gap is None:
                raise MstError(f"MST key {key!r} is not present")
            chi = keys[i] if i < n else hi
            old, merged = self._delete(self.open(gap, node.height - 1, clo, chi), key, expected, clo, chi)
        node.set_gap(i, merged)
        node.cid = None
        return old, (node if keys or node.left is not None else None)

    def _merge(self, a: Ptr, b: Ptr, height: int, lo: bytes, mid: bytes, hi: bytes) -> Ptr:
        """Join two neighbouring subtrees of ``height``: ``a`` in (lo, mid), ``b`` in (mid, hi)."""
        if a is None:
            return b
        if b is None:
            return a
        left = self.open(a, height, lo, mid)
        right = self.open(b, height, mid, hi)
        n = len(left.keys)
        inner_hi = right.keys[0] if right.keys else hi
        if n:
            last = left.ents[-1]
            last["t"] = self._merge(last["t"], right.left, height - 1, left.keys[-1], mid, inner_hi)
        else:
            left.left = self._merge(left.left, right.left, height - 1, lo, mid, inner_hi)
        left.keys += right.keys
        left.ents += right.ents
        if n and right.keys:
            _rekey(left.keys, left.ents, n)
        left.cid = None
        return left

    def update(self, key: bytes, val: bytes, expected: bytes | None = None) -> bytes:
        """Set the value of present ``key``, return the old one; ``MstError`` if not ``expected``."""
        node = self.root
        lo, hi = _LO, _HI
        while node is not None:
            keys = node.keys
            i = bisect_left(keys, key)
            n = len(keys)
            node.cid = None
            if i < n and keys[i] == key:
                ent = node.ents[i]
                old: bytes = ent["v"]
                if expected is not None and old != expected:
                    raise MstError(f"MST key {key!r} does not have the expected value")
                if key_height(key) != node.height:
                    raise MstError(f"MST key {key!r} is in a node of the wrong height")
                ent["v"] = val
                return old
            gap = node.gap(i)
            if gap is None:
                break
            lo, hi = (keys[i - 1] if i else lo), (keys[i] if i < n else hi)
            child = self.open(gap, node.height - 1, lo, hi)
            node.set_gap(i, child)
            node = child
        raise MstError(f"MST key {key!r} is not present")

    # -- result --------------------------------------------------------------------------

    def seal(self, out: dict[bytes, bytes] | None = None) -> bytes:
        """Hash every edited node; return the root CID, adding new blocks to ``out`` if given."""
        if self.root is None:
            if out is not None:
                out[EMPTY_NODE_CID] = EMPTY_NODE_BLOCK
            return EMPTY_NODE_CID
        return self._seal(self.root, out)

    def _seal(self, node: MemNode, out: dict[bytes, bytes] | None) -> bytes:
        if node.cid is not None:
            return node.cid
        left = node.left
        if type(left) is MemNode:
            left = node.left = self._seal(left, out)
        for ent in node.ents:
            sub = ent["t"]
            if type(sub) is MemNode:
                ent["t"] = self._seal(sub, out)
        block = cbor.encode({"e": node.ents, "l": left})
        cid = node.cid = cid_for_dag_cbor(block)
        if out is not None:
            out[cid] = block
        return cid


def _value(value: bytes | None, what: str, path: str) -> bytes:
    if not is_value_link(value):
        raise MstError(f"{what} of op on {path!r} is not a CID link")
    assert value is not None
    return value


def invert_ops(new_root: bytes, ops: Sequence[OpLike], blocks: Mapping[bytes, bytes], *, strict: bool = False) -> bytes:
    """Undo ``ops`` (last first) on the tree ``new_root`` using only ``blocks``; return the root.

    A create becomes a delete of a key that must hold ``cid``, an update restores ``prev`` over
    a value that must be ``cid``, a delete re-inserts ``prev`` at a key that must be absent.
    The caller compares the result with the event's ``prevData``.

    Always checks: op paths are valid repo paths with the links they need; the ops agree with
    the tree (``MstError``); every node loaded is well formed, at the height its parent implies,
    with keys inside its parent's range (see the module docstring); the key of a create or
    update sits at its own height. Raises ``MissingBlock`` when ``blocks`` lack a node needed.
    Strict mode also checks the syntax and height of every key of every node loaded. Without it
    those keys are checked only through the result: a key the ops do not touch keeps its node
    level through inversion, so when the result equals ``prevData`` (a tree accepted before)
    it was valid there and is valid here. Not checked: nodes not loaded, block hashes.
    """
    tree = PartialTree(blocks, new_root, strict)
    for op in reversed(ops):
        key = path_key(op.path)
        action = op.action
        if action == "create":
            tree.delete(key, _value(op.cid, "cid", op.path))
        elif action == "update":
            tree.update(key, _value(op.prev, "prev", op.path), _value(op.cid, "cid", op.path))
        elif action == "delete":
            tree.insert(key, _value(op.prev, "prev", op.path))
        else:
            raise MstError(f"unknown op action {action!r}")
    return tree.seal()
