"""Whole-repo verification and getRecord proofs: real and built repos pass, each tampering fails by reason."""

from __future__ import annotations

import json
import random
from bisect import bisect_left
from dataclasses import dataclass, field

import libipld
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import mst
from protocol.car import read_car, write_car
from protocol.cid import cid_for_dag_cbor
from protocol.commit import encode_commit
from protocol.crypto import K256, P256, PrivateKey, PublicKey, parse_verification_method
from protocol.dagcbor import CID
from protocol.dagcbor import encode as encode_strict
from protocol.errors import MissingBlock, MstError, ProtocolError, SyntaxInvalid
from protocol.mst_node import encode_parts
from protocol.repo_verify import record_proof_blocks, verify_record_proof, verify_repo
from protocol.repo_writer import RepoWriter, Write
from protocol.syntax import make_tid
from tests.support.testdata import REFPDS_DID_DOCS, load_json, refpds_did_of, refpds_repo_cars

DID = "did:plc:repoverifytest000000001"
OTHER_DID = "did:plc:repoverifytest000000002"
KEY = PrivateKey.from_bytes(K256, bytes(range(1, 33)))
PUB = KEY.public_key()
WRONG = PrivateKey.from_bytes(K256, bytes(range(2, 34))).public_key()
REV = make_tid(1_700_000_000_000_000, 0)
COLLECTIONS = ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow", "com.example.thing"]


# -- building repos ---------------------------------------------------------------------


@dataclass
class Repo:
    """A signed repo in memory: every block, its MST root and its records."""

    did: str
    root: bytes
    commit_cid: bytes
    blocks: dict[bytes, bytes]
    records: dict[str, bytes]
    nodes: dict[bytes, bytes] = field(default_factory=dict)

    def car(self, drop: frozenset[bytes] = frozenset()) -> bytes:
        return write_car([self.commit_cid], [(c, b) for c, b in self.blocks.items() if c not in drop])


def sign(did: str, root: bytes, key: PrivateKey = KEY) -> tuple[bytes, bytes]:
    block = encode_commit(did, root, REV, None, key.sign)
    return cid_for_dag_cbor(block), block


def assemble(
    did: str, root: bytes, nodes: dict[bytes, bytes], records: dict[str, bytes], record_blocks: dict[bytes, bytes]
) -> Repo:
    commit_cid, commit_block = sign(did, root)
    blocks = {commit_cid: commit_block, **nodes, **record_blocks}
    return Repo(did, root, commit_cid, blocks, records, dict(nodes))


def make_repo(paths: list[str], did: str = DID) -> Repo:
    """A repo holding one small record per path, its tree built by ``protocol.mst.build``."""
    record_blocks: dict[bytes, bytes] = {}
    records: dict[str, bytes] = {}
    for path in paths:
        block = libipld.encode_dag_cbor({"$type": path.split("/")[0], "text": path})
        records[path] = cid_for_dag_cbor(block)
        record_blocks[records[path]] = block
    root, nodes = mst.build(records)
    return assemble(did, root, nodes, records, record_blocks)


def tids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_tid(1_690_000_000_000_000 + rng.randrange(10**13), rng.randrange(32)) for _ in range(n)]


def relink(repo: Repo, target: bytes, new_block: bytes) -> Repo:
    """Put ``new_block`` in place of node ``target``, rewrite its ancestors, re-sign the commit."""
    parents: dict[bytes, bytes] = {}
    stack = [repo.root]
    while stack:
        cid = stack.pop()
        node = libipld.decode_dag_cbor(repo.blocks[cid])
        for child in [node["l"], *(e["t"] for e in node["e"])]:
            if child is not None:
                parents[child] = cid
                stack.append(child)
    nodes = dict(repo.nodes)
    old, new = target, cid_for_dag_cbor(new_block)
    nodes[new] = new_block
    while old != repo.root:
        parent = parents[old]
        obj = libipld.decode_dag_cbor(repo.blocks[parent])
        obj["l"] = new if obj["l"] == old else obj["l"]
        for ent in obj["e"]:
            ent["t"] = new if ent["t"] == old else ent["t"]
        block = libipld.encode_dag_cbor(obj)
        old, new = parent, cid_for_dag_cbor(block)
        nodes[new] = block
    record_blocks = {c: repo.blocks[c] for c in repo.records.values()}
    return assemble(repo.did, new, nodes, dict(repo.records), record_blocks)


def node_heights(repo: Repo) -> dict[bytes, int]:
    """Height of every node of the tree (a node without keys gets its parent's minus one)."""
    out: dict[bytes, int] = {}
    stack: list[tuple[bytes, int | None]] = [(repo.root, None)]
    while stack:
        cid, parent = stack.pop()
        node = mst.decode_node(repo.blocks[cid])
        height = mst.key_height(node.entries[0].key) if node.entries else (parent or 1) - 1
        out[cid] = height
        for child in [node.left, *(e.tree for e in node.entries)]:
            if child is not None:
                stack.append((child, height))
    return out


def search_path(blocks: dict[bytes, bytes], root: bytes, path: str) -> list[bytes]:
    """The node CIDs from ``root`` down to where ``path`` is or would be."""
    key = path.encode()
    out = [root]
    node = mst.decode_node(blocks[root])
    while True:
        keys = [e.key for e in node.entries]
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return out
        gap = node.left if i == 0 else node.entries[i - 1].tree
        if gap is None:
            return out
        out.append(gap)
        node = mst.decode_node(blocks[gap])


def reason_of(car: bytes, did: str = DID, key: PublicKey | None = PUB, **kwargs: object) -> str:
    with pytest.raises(ProtocolError) as info:
        verify_repo(car, did, key, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


@pytest.fixture(scope="module")
def writer() -> RepoWriter:
    """A few hundred records written over many commits, with updates and deletes."""
    w = RepoWriter(DID, KEY)
    rng = random.Random(7)
    paths = [f"{rng.choice(COLLECTIONS)}/{tid}" for tid in tids(400, seed=1)]
    for start in range(0, len(paths), 40):
        w.commit(
            [Write("create", p, {"$type": p.split("/")[0], "n": i}) for i, p in enumerate(paths[start : start + 40])]
        )
    w.commit([Write("create", "app.bsky.actor.profile/self", {"$type": "app.bsky.actor.profile"})])
    w.commit([Write("update", p, {"$type": p.split("/")[0], "n": -1}) for p in paths[:30]])
    w.commit([Write("delete", p) for p in paths[30:90]])
    return w


@pytest.fixture(scope="module")
def repo() -> Repo:
    return make_repo([f"{c}/{t}" for c, t in zip(COLLECTIONS * 75, tids(300, seed=2), strict=True)])


# -- valid repos ------------------------------------------------------------------------


def _reference_repos() -> list[tuple[str, PublicKey, bytes]]:
    docs = load_json(REFPDS_DID_DOCS)
    out = []
    for car_path in refpds_repo_cars():
        did = refpds_did_of(car_path)
        vm = next(v for v in docs[did]["verificationMethod"] if v["id"].endswith("#atproto"))
        out.append((did, parse_verification_method(vm), car_path.read_bytes()))
    assert len(out) == 2, "expected the two reference-PDS repo exports"
    return out


def test_reference_pds_repos_verify() -> None:
    for did, key, car in _reference_repos():
        verified = verify_repo(car, did, key)
        parsed = read_car(car)
        assert verified.commit.did == did
        assert verified.commit_cid == parsed.roots[0]
        assert verified.blocks == parsed.blocks  # a PDS export holds only reachable blocks
        assert verified.records == dict(mst.walk(parsed.blocks, verified.commit.data))
        assert verified.records and all(p.startswith("app.bsky.") for p in verified.records)
        assert reason_of(car, did, WRONG) == "bad_signature"


def test_reference_pds_record_proofs() -> None:
    for did, key, car in _reference_repos():
        verified = verify_repo(car, did, key)
        for path, cid in verified.records.items():
            proof = record_proof_blocks(verified.blocks, verified.commit_cid, path)
            assert verify_record_proof(write_car([verified.commit_cid], proof.items()), did, key, path) == cid
        absent = "app.bsky.feed.post/2222222222222"
        proof = record_proof_blocks(verified.blocks, verified.commit_cid, absent)
        assert verify_record_proof(write_car([verified.commit_cid], proof.items()), did, key, absent) is None


def test_writer_repo_verifies(writer: RepoWriter) -> None:
    verified = verify_repo(writer.repo_car(), DID, PUB)
    assert verified.commit_cid == writer.commit_cid
    assert verified.commit.rev == writer.rev
    assert verified.records == dict(sorted(writer.records.items()))
    assert len(verified.records) == 341
    assert list(verified.records) == sorted(verified.records)
    for cid, block in verified.blocks.items():
        assert writer.blocks[cid] == block
    assert all(cid in verified.blocks for cid in verified.records.values())


def test_p256_repo_verifies() -> None:
    key = PrivateKey.generate(P256)
    w = RepoWriter(DID, key)
    w.commit([Write("create", f"app.bsky.feed.post/{t}") for t in tids(50)])
    assert len(verify_repo(w.repo_car(), DID, key.public_key()).records) == 50
    assert reason_of(w.repo_car(), key=PUB) == "bad_signature"


def test_empty_repo_verifies() -> None:
    w = RepoWriter(DID, KEY)
    w.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa")])
    w.commit([Write("delete", "app.bsky.feed.post/3aaaaaaaaaaaa")])
    verified = verify_repo(w.repo_car(), DID, PUB)
    assert verified.records == {}
    assert verified.commit.data == mst.EMPTY_NODE_CID
    assert set(verified.blocks) == {w.commit_cid, mst.EMPTY_NODE_CID}


def test_unreachable_blocks_are_dropped(repo: Repo) -> None:
    stray = libipld.encode_dag_cbor({"stray": True})
    car = write_car([repo.commit_cid], [*repo.blocks.items(), (cid_for_dag_cbor(stray), stray)])
    verified = verify_repo(car, DID, PUB)
    assert verified.blocks == repo.blocks


def test_no_key_skips_only_the_signature(repo: Repo) -> None:
    assert reason_of(repo.car(), key=WRONG) == "bad_signature"
    assert verify_repo(repo.car(), DID, None).records == dict(sorted(repo.records.items()))
    assert reason_of(repo.car(), did=OTHER_DID, key=None) == "repo_mismatch"


# -- tampering --------------------------------------------------------------------------


def test_flipped_record_byte_is_a_hash_mismatch(repo: Repo) -> None:
    car = repo.car()
    record = repo.blocks[repo.records[sorted(repo.records)[5]]]
    at = car.index(record) + len(record) // 2
    flipped = car[:at] + bytes([car[at] ^ 0x01]) + car[at + 1 :]
    assert reason_of(flipped) == "bad_block_hash"


def test_removed_mst_nodes_are_missing_blocks(repo: Repo) -> None:
    for cid in [*list(repo.nodes)[:: max(1, len(repo.nodes) // 15)], repo.root]:
        assert reason_of(repo.car(drop=frozenset({cid}))) == "missing_block"
    assert reason_of(repo.car(drop=frozenset({repo.commit_cid}))) == "missing_block"


def test_removed_record_block(repo: Repo) -> None:
    path = sorted(repo.records)[17]
    car = repo.car(drop=frozenset({repo.records[path]}))
    assert reason_of(car) == "missing_block"
    verified = verify_repo(car, DID, PUB, require_records=False)
    assert verified.records[path] == repo.records[path]
    assert repo.records[path] not in verified.blocks


def test_swapped_entries_in_a_node_are_bad_mst(repo: Repo) -> None:
    cid = next(c for c, b in repo.nodes.items() if len(mst.decode_node(b).entries) >= 3)
    node = mst.decode_node(repo.nodes[cid])
    ents = list(node.entries)
    ents[0], ents[1] = ents[1], ents[0]
    block = encode_parts(node.left, [e.key for e in ents], [e.value for e in ents], [e.tree for e in ents])
    tampered = relink(repo, cid, block)
    assert verify_repo(relink(repo, cid, repo.nodes[cid]).car(), DID, PUB)  # relinking alone is harmless
    assert reason_of(tampered.car()) == "bad_mst"


def test_swapped_subtrees_break_the_global_key_order(repo: Repo) -> None:
    """Every node is valid on its own; only the ranges given by the parents catch this."""
    cid, node = next(
        (c, n)
        for c, n in ((c, mst.decode_node(b)) for c, b in repo.nodes.items())
        if n.left is not None and n.entries and n.entries[0].tree is not None
    )
    first = node.entries[0]
    ents = [mst.Entry(first.key, first.value, node.left), *node.entries[1:]]
    block = mst.encode_node(mst.Node(first.tree, tuple(ents)))
    with pytest.raises(MstError, match="range"):
        verify_repo(relink(repo, cid, block).car(), DID, PUB)


def _key_above(key: bytes, height: int) -> bytes:
    """The first key ``key + suffix`` (sorting just after ``key``) whose MST height is ``height``."""
    n = 0
    while True:
        candidate = key + str(n).encode()
        if mst.key_height(candidate) == height:
            return candidate
        n += 1


def test_key_at_the_wrong_height_is_bad_mst(repo: Repo) -> None:
    heights = node_heights(repo)
    leaf_cid = next(c for c, h in heights.items() if h == 0 and len(mst.decode_node(repo.nodes[c]).entries) >= 2)
    leaf = mst.decode_node(repo.nodes[leaf_cid])
    first = leaf.entries[0]
    # one key of height 1 among keys of height 0 (still in order and in range)
    mixed = (first, mst.Entry(_key_above(first.key, 1), first.value), *leaf.entries[1:])
    block = mst.encode_node(mst.Node(None, mixed))
    with pytest.raises(MstError, match="mixes"):
        verify_repo(relink(repo, leaf_cid, block).car(), DID, PUB)
    # a whole leaf of height-1 keys one level too low
    lifted = (mst.Entry(_key_above(first.key, 1), first.value),)
    block = mst.encode_node(mst.Node(None, lifted))
    with pytest.raises(MstError, match="height"):
        verify_repo(relink(repo, leaf_cid, block).car(), DID, PUB)


def _first_key(collection: str, height: int) -> str:
    return next(f"{collection}/{n}" for n in range(10**6) if mst.key_height(f"{collection}/{n}") == height)


def test_level_skipped_is_bad_mst() -> None:
    """A height-2 node pointing straight at a leaf: the empty height-1 node between is missing."""
    low, high = _first_key("app.bsky.feed.post", 0), _first_key("com.example.thing", 2)
    good = make_repo([low, high])
    assert verify_repo(good.car(), DID, PUB)
    assert sorted(node_heights(good).values()) == [0, 1, 2]
    leaf = mst.encode_node(mst.Node(None, (mst.Entry(low.encode(), good.records[low]),)))
    top = mst.encode_node(mst.Node(cid_for_dag_cbor(leaf), (mst.Entry(high.encode(), good.records[high]),)))
    nodes: dict[bytes, bytes] = {cid_for_dag_cbor(top): top, cid_for_dag_cbor(leaf): leaf}
    records = {c: good.blocks[c] for c in good.records.values()}
    bad = assemble(DID, cid_for_dag_cbor(top), nodes, good.records, records)
    with pytest.raises(MstError, match="height"):
        verify_repo(bad.car(), DID, PUB)


def test_non_maximal_prefix_compression_is_bad_mst(repo: Repo) -> None:
    cid = next(c for c, b in repo.nodes.items() if len(mst.decode_node(b).entries) >= 2)
    node = libipld.decode_dag_cbor(repo.nodes[cid])
    full = node["e"][0]["k"][: node["e"][1]["p"]] + node["e"][1]["k"]
    node["e"][1]["p"], node["e"][1]["k"] = 0, full
    with pytest.raises(MstError, match="prefix"):
        verify_repo(relink(repo, cid, libipld.encode_dag_cbor(node)).car(), DID, PUB)


def test_non_canonical_node_encoding_is_bad_mst(repo: Repo) -> None:
    """A record link written as a plain byte string decodes the same: only re-encoding shows it."""
    cid = next(iter(repo.nodes))
    node = libipld.decode_dag_cbor(repo.nodes[cid])

    def link(value: bytes | None) -> CID | None:
        return None if value is None else CID(value)

    obj = {
        "e": [{"k": e["k"], "p": e["p"], "t": link(e["t"]), "v": e["v"]} for e in node["e"]],  # v: bytes, not link
        "l": link(node["l"]),
    }
    block = encode_strict(obj)
    assert block != repo.nodes[cid] and mst.decode_node(block) == mst.decode_node(repo.nodes[cid])
    with pytest.raises(MstError, match="canonical"):
        verify_repo(relink(repo, cid, block).car(), DID, PUB)


def test_invalid_repo_paths_are_bad_mst() -> None:
    for path in ["a.b/x", "app.bsky.feed.post/a:b:c~", "1app.bsky.post/x"]:
        repo = make_repo([f"app.bsky.feed.post/{t}" for t in tids(20)] + [path])
        expected_ok = path == "app.bsky.feed.post/a:b:c~"
        if expected_ok:
            assert verify_repo(repo.car(), DID, PUB).records[path] == repo.records[path]
        else:
            with pytest.raises(MstError, match="repo path"):
                verify_repo(repo.car(), DID, PUB)


def test_node_reachable_twice_is_bad_mst(repo: Repo) -> None:
    cid, node = next(
        (c, n) for c, n in ((c, mst.decode_node(b)) for c, b in repo.nodes.items()) if n.left is not None and n.entries
    )
    ents = (mst.Entry(node.entries[0].key, node.entries[0].value, node.left), *node.entries[1:])
    block = mst.encode_node(mst.Node(node.left, ents))
    with pytest.raises(MstError, match="twice"):
        verify_repo(relink(repo, cid, block).car(), DID, PUB)


def test_commit_for_another_did(repo: Repo) -> None:
    other = assemble(OTHER_DID, repo.root, repo.nodes, repo.records, {c: repo.blocks[c] for c in repo.records.values()})
    assert reason_of(other.car()) == "repo_mismatch"
    assert verify_repo(other.car(), OTHER_DID, PUB).records == dict(sorted(repo.records.items()))


def test_root_that_is_not_a_commit(repo: Repo) -> None:
    car = write_car([repo.root], repo.blocks.items())
    assert reason_of(car) == "bad_commit"
    junk = b"\x01\x02"
    car = write_car([cid_for_dag_cbor(junk)], [(cid_for_dag_cbor(junk), junk), *repo.blocks.items()])
    assert reason_of(car) == "bad_commit"


def test_commit_data_pointing_at_a_record(repo: Repo) -> None:
    record_cid = next(iter(repo.records.values()))
    bad = assemble(DID, record_cid, repo.nodes, repo.records, {c: repo.blocks[c] for c in repo.records.values()})
    assert reason_of(bad.car()) == "bad_mst"


def test_roots_must_be_exactly_one(repo: Repo) -> None:
    assert reason_of(write_car([], repo.blocks.items())) == "bad_car"
    assert reason_of(write_car([repo.commit_cid, repo.root], repo.blocks.items())) == "bad_car"


@pytest.mark.parametrize(
    "data", [b"", b"\x00", b"garbage bytes", b"\xff" * 64, json.dumps({"roots": []}).encode(), bytes(range(256))]
)
def test_garbage_is_bad_car(data: bytes) -> None:
    assert reason_of(data) == "bad_car"


def test_truncated_reference_cars_fail_at_every_offset() -> None:
    for did, key, car in _reference_repos():
        for cut in range(len(car)):
            assert reason_of(car[:cut], did, key) in ("bad_car", "missing_block"), cut


def test_truncated_built_car_fails_at_many_offsets(repo: Repo) -> None:
    car = repo.car()
    for cut in [*range(0, 200), *range(200, len(car), 97), len(car) - 1]:
        assert reason_of(car[:cut]) in ("bad_car", "missing_block"), cut


def test_limits(repo: Repo) -> None:
    car = repo.car()
    assert reason_of(car, max_blocks=len(repo.blocks) - 1) == "too_large"
    assert reason_of(car, max_bytes=len(car) - 1) == "too_large"
    assert verify_repo(car, DID, PUB, max_blocks=len(repo.blocks), max_bytes=len(car))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        verify_repo(data, DID, PUB)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_byte_flips_always_fail(repo: Repo, data: st.DataObject) -> None:
    car = bytearray(repo.car())
    for at in data.draw(st.sets(st.integers(0, len(car) - 1), min_size=1, max_size=3)):
        car[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        verify_repo(bytes(car), DID, PUB)


# -- getRecord proofs -------------------------------------------------------------------


def proof_car(repo: Repo, path: str) -> tuple[bytes, dict[bytes, bytes]]:
    blocks = record_proof_blocks(repo.blocks, repo.commit_cid, path)
    return write_car([repo.commit_cid], blocks.items()), blocks


def test_proofs_of_present_and_absent_paths(repo: Repo) -> None:
    for path in sorted(repo.records)[::7]:
        car, blocks = proof_car(repo, path)
        assert verify_record_proof(car, DID, PUB, path) == repo.records[path]
        assert next(iter(blocks)) == repo.commit_cid
        assert repo.records[path] in blocks
        assert len(blocks) < 25
    for path in ["app.bsky.feed.post/2222222222222", "zzz.example.x/last", "aaa.example.x/first"]:
        car, blocks = proof_car(repo, path)
        assert verify_record_proof(car, DID, PUB, path) is None
        assert set(blocks) == {repo.commit_cid, *search_path(repo.blocks, repo.root, path)}


def test_proof_of_an_empty_repo() -> None:
    empty = make_repo([])
    car, _ = proof_car(empty, "app.bsky.feed.post/3aaaaaaaaaaaa")
    assert verify_record_proof(car, DID, PUB, "app.bsky.feed.post/3aaaaaaaaaaaa") is None


def test_proof_missing_a_path_node(repo: Repo) -> None:
    present = sorted(repo.records)[40]
    absent = present[:-1] + ("2" if present[-1] != "2" else "3")
    for path in (present, absent):
        car_blocks = record_proof_blocks(repo.blocks, repo.commit_cid, path)
        nodes = search_path(repo.blocks, repo.root, path)
        assert len(nodes) >= 2
        for cid in nodes:
            car = write_car([repo.commit_cid], [(c, b) for c, b in car_blocks.items() if c != cid])
            with pytest.raises(MissingBlock):
                verify_record_proof(car, DID, PUB, path)
    bare = record_proof_blocks(repo.blocks, repo.commit_cid, present)
    del bare[repo.records[present]]
    with pytest.raises(MissingBlock):
        verify_record_proof(write_car([repo.commit_cid], bare.items()), DID, PUB, present)


def test_proof_checks_commit_and_path(repo: Repo) -> None:
    path = sorted(repo.records)[3]
    car, _ = proof_car(repo, path)
    with pytest.raises(ProtocolError) as info:
        verify_record_proof(car, DID, WRONG, path)
    assert info.value.reason == "bad_signature"
    with pytest.raises(ProtocolError) as info:
        verify_record_proof(car, OTHER_DID, PUB, path)
    assert info.value.reason == "repo_mismatch"
    assert verify_record_proof(car, DID, None, path) == repo.records[path]
    for bad in ["nocollection", "a.b/x", "app.bsky.feed.post/..", "app.bsky.feed.post/ü"]:
        with pytest.raises(SyntaxInvalid):
            verify_record_proof(car, DID, PUB, bad)
        with pytest.raises(SyntaxInvalid):
            record_proof_blocks(repo.blocks, repo.commit_cid, bad)


def test_proof_blocks_need_the_repo_blocks(repo: Repo) -> None:
    with pytest.raises(MissingBlock):
        record_proof_blocks({}, repo.commit_cid, sorted(repo.records)[0])
    path = sorted(repo.records)[0]
    partial = {c: b for c, b in repo.blocks.items() if c != repo.records[path]}
    with pytest.raises(MissingBlock):
        record_proof_blocks(partial, repo.commit_cid, path)


def test_truncated_proofs_fail(repo: Repo) -> None:
    path = sorted(repo.records)[100]
    car, _ = proof_car(repo, path)
    for cut in range(len(car)):
        with pytest.raises(ProtocolError):
            verify_record_proof(car[:cut], DID, PUB, path)


paths = st.builds(
    lambda c, r: f"{c}/{r}",
    st.sampled_from(COLLECTIONS),
    st.text(alphabet="abz0129-_~:.", min_size=1, max_size=8).filter(lambda r: r not in (".", "..")),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(paths, max_size=120), st.lists(paths, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_random_repos_and_proofs(present: set[str], probes: list[str], rng: random.Random) -> None:
    repo = make_repo(sorted(present))
    verified = verify_repo(repo.car(), DID, PUB)
    assert verified.records == dict(sorted(repo.records.items()))
    picks = probes + rng.sample(sorted(present), min(3, len(present)))
    for path in picks:
        car, blocks = proof_car(repo, path)
        assert verify_record_proof(car, DID, PUB, path) == repo.records.get(path)
        on_path = search_path(repo.blocks, repo.root, path)
        assert set(on_path) <= set(blocks)
        cid = rng.choice(on_path)
        trimmed = write_car([repo.commit_cid], [(c, b) for c, b in blocks.items() if c != cid])
        with pytest.raises(MissingBlock):
            verify_record_proof(trimmed, DID, PUB, path)
