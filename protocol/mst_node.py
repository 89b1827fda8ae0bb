"""MST node format: keys and their heights, and strict decoding/canonical encoding of node blocks.

A node block is the DAG-CBOR map ``{"e": [{"k", "p", "t", "v"}...], "l": link|null}``: ``l``
points to the subtree left of every entry, each entry holds a key (``p`` bytes shared with the
previous key of the node, then the suffix ``k``), the record link ``v`` and the subtree ``t``
between it and the next entry. Keys are repo paths ``collection/rkey`` as ASCII bytes; a key's
height is the number of leading zero bits of its sha-256 counted in 2-bit steps (fanout 4).

``parse_node`` is the strict parser used by every tree walk. It checks: the exact field sets,
every field's type, subtree links are dag-cbor/sha-256 CIDs, value links are CIDv1 links, the
prefix compression is the mandatory (maximal) one, keys strictly increase and are valid repo
paths, all keys of a node have one height, a node of height 0 has no subtrees (the lenient mode
for inversion skips the key syntax and all heights but the first key's). It cannot know
the height a node must have (its parent's minus one: tree walks check that) and cannot tell a
byte string from a link (libipld decodes both to ``bytes``): such a block is not canonical, so
re-encoding it gives other bytes and another CID, which a root-CID comparison then exposes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from protocol import cbor
from protocol.cid import CODEC_DAG_CBOR, CidBytes, cid_for_dag_cbor
from protocol.errors import CborError, MstError

MAX_KEY_BYTES = 1024  # the reference implementation's limit on a whole repo path
_NODE_LINK_PREFIX = bytes((0x01, CODEC_DAG_CBOR, 0x12, 0x20))
_KEY_RE = re.compile(rb"(?!\.\.?/)[A-Za-z0-9_~:.\-]+/(?!\.\.?\Z)[A-Za-z0-9_~:.\-]+")

# (left, full keys, entry maps {"k", "p", "t", "v"}, height): what every tree walk works on.
ParsedNode = tuple[bytes | None, list[bytes], list[dict[str, Any]], int | None]


def key_height(key: str | bytes) -> int:
    """The MST height of a key: leading zero bits of sha-256(key), divided by two."""
    return _digest_height(hashlib.sha256(key.encode() if isinstance(key, str) else key).digest())


def _digest_height(digest: bytes) -> int:
    return (256 - int.from_bytes(digest, "big").bit_length()) >> 1


_BYTE_HEIGHT = bytes((8 - b.bit_length()) >> 1 for b in range(256))  # for a non-zero first byte


def is_valid_key(key: bytes) -> bool:
    """True for a repo path usable as an MST key: ``collection/rkey`` of allowed ASCII."""
    return len(key) <= MAX_KEY_BYTES and _KEY_RE.fullmatch(key) is not None


def path_key(path: str | bytes) -> bytes:
    """Validate a repo path and return it as MST key bytes; ``MstError`` when invalid."""
    try:
        key = path.encode("ascii") if isinstance(path, str) else path
    except UnicodeEncodeError:
        raise MstError(f"MST key {path!r} is not ASCII") from None
    if type(key) is not bytes or not is_valid_key(key):
        raise MstError(f"invalid MST key {path!r}")
    return key


def common_prefix_len(a: bytes, b: bytes) -> int:
    """Number of leading bytes ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    diff = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - ((diff.bit_length() + 7) >> 3)


def is_node_link(value: Any) -> bool:
    """True for a link an MST node may use for a subtree (CIDv1, dag-cbor, sha-256)."""
    return type(value) is bytes and len(value) == 36 and value[:4] == _NODE_LINK_PREFIX


def is_value_link(value: Any) -> bool:
    """True for a plausible record link (binary CIDv1; the codec and hash are the record's own)."""
    return type(value) is bytes and len(value) > 4 and value[0] == 0x01


def parse_node(block: bytes, strict: bool = True) -> ParsedNode:
    """Decode and check one node block (see the module docstring); ``MstError`` when malformed.

    Returns (left link, full keys, the decoded entry maps, the node's height or ``None`` for a
    node without entries). The entry maps are libipld's own objects. With ``strict`` false the
    repo-path syntax and the height of every key but the first are not checked (see
    ``mst_invert.invert_ops`` for when that is enough).
    """
    try:
        obj = cbor.decode(block)
    except CborError as exc:
        raise MstError(f"MST node is not DAG-CBOR: {exc}") from None
    if type(obj) is not dict or len(obj) != 2 or "e" not in obj or "l" not in obj:
        raise MstError("MST node must be a map of exactly 'e' and 'l'")
    left = obj["l"]
    ents = obj["e"]
    if left is not None and (type(left) is not bytes or len(left) != 36 or left[:4] != _NODE_LINK_PREFIX):
        raise MstError("MST node 'l' is not a dag-cbor link or null")
    if type(ents) is not list:
        raise MstError("MST node 'e' is not an array")
    keys: list[bytes] = []
    height = None
    prev = b""
    has_sub = left is not None
    sha256 = hashlib.sha256
    key_ok = _KEY_RE.fullmatch
    for ent in ents:
        if type(ent) is not dict or len(ent) != 4:
            raise MstError("MST entry must be a map of exactly 'k', 'p', 't' and 'v'")
        try:
            p = ent["p"]
            k = ent["k"]
            v = ent["v"]
            t = ent["t"]
        except KeyError:
            raise MstError("MST entry must be a map of exactly 'k', 'p', 't' and 'v'") from None
        if type(p) is not int or type(k) is not bytes:
            raise MstError("MST entry 'p' must be an integer and 'k' bytes")
        size = len(prev)
        if p:
            if p < 0 or p > size:
                raise MstError(f"MST entry prefix length {p} exceeds the previous key")
            key = prev[:p] + k
        else:
            key = k
        if not k or (p < size and k[0] <= prev[p]):
            raise MstError("MST keys not strictly increasing, or prefix not maximal")
        if type(v) is not bytes or len(v) <= 4 or v[0] != 0x01:
            raise MstError("MST entry 'v' is not a CID link")
        if t is not None:
            if type(t) is not bytes or len(t) != 36 or t[:4] != _NODE_LINK_PREFIX:
                raise MstError("MST entry 't' is not a dag-cbor link or null")
            has_sub = True
        if strict or height is None:
            if strict and (len(key) > MAX_KEY_BYTES or key_ok(key) is None):
                raise MstError(f"invalid MST key {key!r}")
            digest = sha256(key).digest()
            own = _BYTE_HEIGHT[digest[0]] if digest[0] else _digest_height(digest)
            if own != height:
                if height is not None:
                    raise MstError(f"MST node mixes keys of height {height} and {own}")
                height = own
        keys.append(key)
        prev = key
    if height == 0 and has_sub:
        raise MstError("MST node at height 0 has a subtree")
    return left, keys, ents, height


def make_entry(prev_key: bytes, key: bytes, value: bytes, tree: Any) -> dict[str, Any]:
    """An entry map for ``key`` following ``prev_key`` in its node (prefix-compressed)."""
    p = common_prefix_len(prev_key, key)
    return {"k": key[p:], "p": p, "t": tree, "v": value}


def encode_parts(left: bytes | None, keys: list[bytes], vals: list[bytes], subs: list[bytes | None]) -> bytes:
    """Canonical node block from sorted, valid keys (callers guarantee both)."""
    entries = []
    prev = b""
    for key, val, sub in zip(keys, vals, subs, strict=True):
        p = common_prefix_len(prev, key)
        entries.append({"k": key[p:], "p": p, "t": sub, "v": val})
        prev = key
    return cbor.encode({"e": entries, "l": left})


EMPTY_NODE_BLOCK = encode_parts(None, [], [], [])
EMPTY_NODE_CID: CidBytes = cid_for_dag_cbor(EMPTY_NODE_BLOCK)


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a node: a full key, its record link and the subtree to its right."""

    key: bytes
    value: bytes
    tree: bytes | None = None


@dataclass(frozen=True, slots=True)
class Node:
    """A decoded node: the leftmost subtree link and the entries with full keys, in order."""

    left: bytes | None
    entries: tuple[Entry, ...]


def decode_node(block: bytes, height: int | None = None) -> Node:
    """Strictly decode a node block; ``height``, when given, is the height its keys must have."""
    left, keys, ents, own = parse_node(block)
    if height is not None and own is not None and own != height:
        raise MstError(f"MST node of height {own} where {height} was expected")
    return Node(left, tuple(Entry(k, e["v"], e["t"]) for k, e in zip(keys, ents, strict=True)))


def encode_node(node: Node) -> bytes:
    """The canonical block of a node; ``MstError`` for unsorted or invalid keys or bad links."""
    if node.left is not None and not is_node_link(node.left):
        raise MstError("MST node 'l' is not a dag-cbor link")
    prev = b""
    for ent in node.entries:
        if type(ent.key) is not bytes or not is_valid_key(ent.key) or ent.key <= prev:
            raise MstError(f"MST keys must be valid and strictly increasing: {ent.key!r}")
        if not is_value_link(ent.value) or (ent.tree is not None and not is_node_link(ent.tree)):
            raise MstError(f"MST entry {ent.key!r} has a bad link")
        prev = ent.key
    return encode_parts(
        node.left,
        [e.key for e in node.entries],
        [e.value for e in node.entries],
        [e.tree for e in node.entries],
    )
