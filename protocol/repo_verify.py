"""Whole-repo and single-record verification: getRepo CARs, getRecord proofs, and building those proofs.

``verify_repo`` checks a full repo CAR (as ``com.atproto.sync.getRepo`` serves it) and returns
only what is reachable from its signed commit. It always checks:

- the CAR: size within ``max_bytes``, at most ``max_blocks`` blocks, every block's sha-256
  equal to its CID (``protocol.car.read_car``), exactly one root;
- the commit: present, a well-formed version 3 commit (``decode_commit``), for ``did``
  (``CommitError`` with reason ``repo_mismatch`` otherwise), its ``data`` a dag-cbor link;
- the signature, with ``key`` (skipped when ``key`` is ``None``: the caller checks it later);
- the MST under ``commit.data``: every node present (``MissingBlock``); every node strictly
  decoded (exact fields, types, maximal prefix compression, keys strictly increasing) and
  byte-identical to its canonical encoding; every key at its own height (``key_height``) in a
  node at its parent's height minus one; every key inside the range its parent gives it, so
  keys strictly increase across the whole tree; no empty node below the root except as a pointer
  to a lower level, no subtree at height 0, no node reachable twice; every key a valid repo path
  (collection an NSID, rkey a record key);
- with ``require_records`` (the default), every record block present.

It does not check: record contents (opaque to a relay: only their hashes, by the CAR reader),
the commit's ``prev`` or ``rev`` against earlier state, blocks unreachable from the commit
(accepted and dropped). Time and memory are linear in the input, bounded by ``max_bytes`` and
``max_blocks``; tree depth is bounded by key heights (at most 128), and the walk is iterative.

``verify_record_proof`` checks a ``getRecord`` CAR (commit, the MST nodes on the path to one
key, the record) and ``record_proof_blocks`` builds one from a repo's blocks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass

from protocol import cbor
from protocol.car import CarFile, read_car
from protocol.cid import cid_to_str
from protocol.commit import Commit, decode_commit
from protocol.crypto import PublicKey
from protocol.errors import CarError, CborError, CommitError, MissingBlock, MstError, SignatureError, SyntaxInvalid
from protocol.mst import proof_blocks
from protocol.mst_invert import MemNode, PartialTree
from protocol.mst_node import is_node_link, path_key
from protocol.syntax import is_valid_nsid, is_valid_record_key

MAX_REPO_BLOCKS = 2_000_000  # default bound on blocks in a getRepo CAR (commit + nodes + records)
MAX_REPO_BYTES = 1024 * 1024 * 1024  # default bound on a getRepo CAR's size
MAX_PROOF_BLOCKS = 1_000  # default bound on blocks in a getRecord CAR (a path is ~20 nodes)
MAX_PROOF_BYTES = 8 * 1024 * 1024  # default bound on a getRecord CAR (the record is up to 2 MiB)

_LO = b""  # below every key
_HI = b"\xff"  # above every key (keys are ASCII)


@dataclass(frozen=True, slots=True)
class VerifiedRepo:
    """A verified repo: its commit, and only the blocks reachable from it.

    ``blocks`` holds the commit, every MST node and every record block present (all of them
    with ``require_records``); ``records`` maps each repo path to its record CID, in key order.
    """

    commit: Commit
    commit_cid: bytes
    blocks: dict[bytes, bytes]
    records: dict[str, bytes]


def verify_repo(
    car_bytes: bytes,
    did: str,
    key: PublicKey | None,
    *,
    max_blocks: int = MAX_REPO_BLOCKS,
    max_bytes: int = MAX_REPO_BYTES,
    require_records: bool = True,
) -> VerifiedRepo:
    """Verify a full repo CAR for ``did`` (see the module docstring); ``ProtocolError`` if bad."""
    car = _read(car_bytes, max_blocks, max_bytes)
    commit_cid, commit = _signed_commit(car, did, key)
    blocks = car.blocks
    nodes = _walk_tree(blocks, commit.data)
    reachable: dict[bytes, bytes] = {commit_cid: blocks[commit_cid]}
    reachable.update(nodes.blocks)
    records = dict(sorted(nodes.records))
    for path, cid in records.items():
        block = blocks.get(cid)
        if block is not None:
            reachable[cid] = block
        elif require_records:
            raise MissingBlock(f"record {path} ({cid_to_str(cid)}) is not in the CAR")
    return VerifiedRepo(commit=commit, commit_cid=commit_cid, blocks=reachable, records=records)


def verify_record_proof(
    car_bytes: bytes,
    did: str,
    key: PublicKey | None,
    path: str,
    *,
    max_blocks: int = MAX_PROOF_BLOCKS,
    max_bytes: int = MAX_PROOF_BYTES,
) -> bytes | None:
    """Check a getRecord CAR: the record CID at ``path``, or ``None`` when the proof shows absence.

    Checks the CAR and the commit as ``verify_repo`` does, then every node on the search path
    for ``path`` the same way (format, canonical bytes, heights, key ranges, key syntax). Raises
    ``MissingBlock`` when a node on the path, or the record block of a present key, is absent;
    ``SyntaxInvalid`` when ``path`` itself is not a valid repo path.
    """
    key_bytes = _repo_path(path)
    car = _read(car_bytes, max_blocks, max_bytes)
    _, commit = _signed_commit(car, did, key)
    value, _ = _search(car.blocks, commit.data, key_bytes)
    if value is not None and value not in car.blocks:
        raise MissingBlock(f"record {path} ({cid_to_str(value)}) is not in the proof")
    return value


def record_proof_blocks(blocks: Mapping[bytes, bytes], commit_cid: bytes, path: str) -> dict[bytes, bytes]:
    """The blocks of a getRecord CAR for ``path``: commit, MST proof nodes, record if present.

    The nodes are the search path (root first) plus, for a present key, the spines of its
    neighbouring subtrees (``protocol.mst.proof_blocks``: enough to prove the key's deletion
    too). ``MissingBlock`` when ``blocks`` lack the commit, a node needed or the record.
    """
    key_bytes = _repo_path(path)
    commit_block = blocks.get(commit_cid)
    if commit_block is None:
        raise MissingBlock(f"commit {cid_to_str(commit_cid)} is not among the blocks")
    commit = _decode_commit(commit_block)
    value, path_nodes = _search(blocks, commit.data, key_bytes)
    out: dict[bytes, bytes] = {commit_cid: commit_block}
    for cid in path_nodes:
        out[cid] = blocks[cid]
    for cid in sorted(proof_blocks(blocks, commit.data, [key_bytes]) - out.keys()):
        out[cid] = blocks[cid]
    if value is not None:
        record = blocks.get(value)
        if record is None:
            raise MissingBlock(f"record {path} ({cid_to_str(value)}) is not among the blocks")
        out[value] = record
    return out


# -- shared steps --------------------------------------------------------------------------


def _read(car_bytes: bytes, max_blocks: int, max_bytes: int) -> CarFile:
    if not isinstance(car_bytes, bytes | bytearray | memoryview):
        raise CarError("CAR input is not bytes")
    if len(car_bytes) > max_bytes:
        raise CarError(f"CAR of {len(car_bytes)} bytes exceeds {max_bytes}", reason="too_large")
    car = read_car(car_bytes, max_blocks=max_blocks)
    if len(car.roots) != 1:
        raise CarError(f"a repo CAR needs exactly one root, not {len(car.roots)}")
    return car


def _decode_commit(block: bytes) -> Commit:
    try:
        commit = decode_commit(block)
    except CborError as exc:
        raise CommitError(f"commit block is not DAG-CBOR: {exc}") from None
    if not is_node_link(commit.data):
        raise CommitError("commit data is not a dag-cbor sha-256 link")
    return commit


def _signed_commit(car: CarFile, did: str, key: PublicKey | None) -> tuple[bytes, Commit]:
    """The root commit of ``car``: present, well formed, for ``did``, signed by ``key``."""
    commit_cid = car.roots[0]
    block = car.blocks.get(commit_cid)
    if block is None:
        raise MissingBlock(f"root commit {cid_to_str(commit_cid)} is not in the CAR")
    commit = _decode_commit(block)
    if commit.did != did:
        raise CommitError(f"commit is for {commit.did}, not {did}", reason="repo_mismatch")
    if key is not None and not commit.verify(key):
        raise SignatureError(f"commit signature of {did} does not verify with {key.did_key()}")
    return commit_cid, commit


def _repo_path(path: str) -> bytes:
    """``path`` as MST key bytes; ``SyntaxInvalid`` unless it is ``<nsid>/<record key>``."""
    try:
        key = path_key(path)
    except MstError as exc:
        raise SyntaxInvalid(str(exc)) from None
    if not _is_repo_path(key):
        raise SyntaxInvalid(f"invalid repo path {path!r}")
    return key


def _is_repo_path(key: bytes) -> bool:
    """True when an MST key (already ``collection/rkey`` ASCII) has an NSID and a record key."""
    collection, _, rkey = key.decode("ascii").partition("/")
    return is_valid_nsid(collection) and is_valid_record_key(rkey)


def _check_node(node: MemNode, block: bytes) -> None:
    """The node's keys are valid repo paths and its block is the canonical encoding."""
    for key in node.keys:
        if not _is_repo_path(key):
            raise MstError(f"MST key {key!r} is not a valid repo path")
    try:
        canonical = cbor.encode({"e": node.ents, "l": node.left})
    except CborError as exc:
        raise MstError(f"MST node cannot be re-encoded: {exc}") from None
    if canonical != block:
        raise MstError(f"MST node {cid_to_str(node.cid or b'')} is not canonically encoded")


@dataclass(slots=True)
class _Walk:
    blocks: dict[bytes, bytes]  # every node reached, root first
    records: list[tuple[str, bytes]]  # (path, record CID)


def _walk_tree(blocks: Mapping[bytes, bytes], root: bytes) -> _Walk:
    """Load and check every node under ``root``; collect node blocks and (path, value) pairs."""
    tree = PartialTree(blocks, root)  # checks the root node and that it is not a bare pointer
    out = _Walk({root: blocks[root]}, [])
    if tree.root is None:
        _check_node(MemNode(0, None, [], [], root), blocks[root])
        return out
    pending: list[tuple[MemNode, bytes, bytes]] = [(tree.root, _LO, _HI)]
    while pending:
        node, lo, hi = pending.pop()
        assert node.cid is not None  # loaded from a block, never edited
        _check_node(node, blocks[node.cid])
        keys = node.keys
        n = len(keys)
        for i in range(n + 1):
            gap = node.gap(i)
            if gap is not None:
                assert isinstance(gap, bytes)
                if gap in out.blocks:
                    raise MstError(f"MST node {cid_to_str(gap)} is reachable twice")
                clo, chi = (keys[i - 1] if i else lo), (keys[i] if i < n else hi)
                child = tree.open(gap, node.height - 1, clo, chi)  # height, range, emptiness
                out.blocks[gap] = blocks[gap]
                pending.append((child, clo, chi))
        out.records.extend((k.decode("ascii"), e["v"]) for k, e in zip(keys, node.ents, strict=True))
    return out


def _search(blocks: Mapping[bytes, bytes], root: bytes, key: bytes) -> tuple[bytes | None, list[bytes]]:
    """The value at ``key`` (or ``None``) and the CIDs of the nodes on its search path, root first.

    Every node on the path gets the checks of a full walk; ``MissingBlock`` if one is absent.
    """
    tree = PartialTree(blocks, root)
    path = [root]
    node = tree.root
    if node is None:
        _check_node(MemNode(0, None, [], [], root), blocks[root])
        return None, path
    lo, hi = _LO, _HI
    while True:
        assert node.cid is not None
        _check_node(node, blocks[node.cid])
        keys = node.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            value: bytes = node.ents[i]["v"]
            return value, path
        gap = node.gap(i)
        if gap is None:
            return None, path
        assert isinstance(gap, bytes)
        lo, hi = (keys[i - 1] if i else lo), (keys[i] if i < len(keys) else hi)
        node = tree.open(gap, node.height - 1, lo, hi)
        path.append(gap)
