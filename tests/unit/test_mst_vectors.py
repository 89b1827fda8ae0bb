"""MST against the interop vectors and the reference PDS: heights, prefixes, proofs, real repos."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import libipld
import pytest

from protocol import mst
from protocol.cid import cid_for_dag_cbor, cid_from_str, cid_to_str, read_varint, verify_block
from protocol.errors import MissingBlock, MstError
from protocol.mst import Op
from tests.support.testdata import VECTORS, refpds_frames, refpds_repo_cars


def _split_car(data: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """(roots, raw blocks by CID) of a CARv1, every block checked against its CID."""
    size, pos = read_varint(data, 0)
    header = libipld.decode_dag_cbor(data[pos : pos + size])
    pos += size
    blocks: dict[bytes, bytes] = {}
    while pos < len(data):
        size, pos = read_varint(data, pos)
        cid, block = data[pos : pos + 36], data[pos + 36 : pos + size]
        assert verify_block(cid, block)
        blocks[cid] = block
        pos += size
    return header["roots"], blocks


def _fixtures() -> list[dict]:
    cases = json.loads((VECTORS / "firehose/commit-proof-fixtures.json").read_text())
    assert len(cases) >= 6
    return cases


def test_key_heights() -> None:
    cases = json.loads((VECTORS / "mst/key_heights.json").read_text())
    assert cases
    for case in cases:
        assert mst.key_height(case["key"]) == case["height"], case
        assert mst.key_height(case["key"].encode()) == case["height"]


def test_common_prefix() -> None:
    cases = json.loads((VECTORS / "mst/common_prefix.json").read_text())
    assert cases
    for case in cases:
        assert mst.common_prefix_len(case["left"].encode(), case["right"].encode()) == case["len"], case


def test_example_keys_heights() -> None:
    # each key names its height: "C2/014073" has height 2
    lines = (VECTORS / "mst/example_keys.txt").read_text().splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert len(keys) >= 100
    for key in keys:
        assert mst.is_valid_key(key.encode())
        assert mst.key_height(key) == int(key[1]), key


@pytest.mark.parametrize("index", range(6))
def test_commit_proof_fixture(index: int) -> None:
    case = _fixtures()[index]
    leaf = cid_from_str(case["leafValue"])
    before, blocks = mst.build([(k, leaf) for k in case["keys"]])
    assert cid_to_str(before) == case["rootBeforeCommit"], case["comment"]

    ops = [Op("create", k, leaf) for k in case["adds"]] + [Op("delete", k, None, leaf) for k in case["dels"]]
    after, new_blocks = mst.apply(blocks, before, ops)
    assert cid_to_str(after) == case["rootAfterCommit"], case["comment"]
    remaining = [k for k in case["keys"] if k not in case["dels"]] + case["adds"]
    assert mst.build([(k, leaf) for k in remaining])[0] == after

    everything = {**blocks, **new_blocks}
    expected = {cid_from_str(c) for c in case["blocksInProof"]}
    assert mst.proof_blocks(everything, after, case["adds"] + case["dels"]) == expected

    proof = {cid: everything[cid] for cid in expected}
    for order in itertools.permutations(ops):
        assert cid_to_str(mst.invert_ops(after, list(order), proof)) == case["rootBeforeCommit"]
        assert cid_to_str(mst.invert_ops(after, list(order), proof, strict=True)) == case["rootBeforeCommit"]
    # the proof may hold neighbours a given op does not need; without a block that is needed
    # inversion raises, it never returns a wrong root
    needed = set()
    for missing in expected:
        short = {cid: block for cid, block in proof.items() if cid != missing}
        try:
            assert cid_to_str(mst.invert_ops(after, ops, short)) == case["rootBeforeCommit"]
        except MissingBlock:
            needed.add(missing)
    assert after in needed


def test_reference_pds_repos_are_recorded() -> None:
    assert len(refpds_repo_cars()) == 2


@pytest.mark.parametrize("car", refpds_repo_cars(), ids=lambda path: path.stem)
def test_reference_pds_repo(car: Path) -> None:
    roots, blocks = _split_car(car.read_bytes())
    data = libipld.decode_dag_cbor(blocks[roots[0]])["data"]
    entries = list(mst.walk(blocks, data))
    assert entries and [k for k, _ in entries] == sorted(k for k, _ in entries)
    for key, value in entries:
        assert mst.get(blocks, data, key) == value
    assert mst.get(blocks, data, "app.bsky.feed.post/zzzzzzzzzzzzz") is None
    root, built = mst.build(entries)
    assert root == data
    for cid, block in built.items():  # byte for byte what the reference PDS wrote
        assert blocks[cid] == block
        assert mst.encode_node(mst.decode_node(block)) == block


def _commits() -> list[tuple[int, dict]]:
    out = []
    for row, raw in refpds_frames():
        if row["t"] == "#commit":
            _, body = libipld.decode_dag_cbor_multi(raw)
            if body["ops"]:
                out.append((row["seq"], body))
    assert len(out) >= 10
    return out


def test_reference_pds_commits_invert_to_prev_data() -> None:
    actions = set()
    multi_op = 0
    for seq, body in _commits():
        roots, blocks = _split_car(body["blocks"])
        data = libipld.decode_dag_cbor(blocks[roots[0]])["data"]
        ops = [Op(o["action"], o["path"], o["cid"], o.get("prev")) for o in body["ops"]]
        actions.update(o.action for o in ops)
        assert mst.invert_ops(data, ops, blocks) == body["prevData"], seq
        assert mst.invert_ops(data, ops, blocks, strict=True) == body["prevData"], seq
        # the reference PDS carries (at least) the covering proof we compute for the same paths
        assert mst.proof_blocks(blocks, data, [o.path for o in ops]) <= set(blocks)
        # the same ops with one of them dropped no longer reproduce prevData
        if len(ops) > 1:
            assert mst.invert_ops(data, ops[1:], blocks) != body["prevData"]
            multi_op += 1
    assert actions == {"create", "update", "delete"}
    assert multi_op >= 1  # the recording has a commit of several ops (applyWrites)


def _absent_key_within_proof(blocks: dict[bytes, bytes], data: bytes, path: str) -> str:
    """A key beside ``path`` that the commit's proof shows absent (not one whose subtree it lacks)."""
    collection, rkey = path.split("/")
    for key in (f"{collection}/{rkey}a", f"{collection}/{rkey[:-1]}", f"{collection}/a", "a/a"):
        try:
            if mst.get(blocks, data, key) is None:
                return key
        except MissingBlock:
            continue
    raise AssertionError(f"no key beside {path} is provably absent in this proof")


def test_reference_pds_commit_ops_inconsistent() -> None:
    _, body = next((s, b) for s, b in _commits() if b["ops"][0]["action"] == "update")
    roots, blocks = _split_car(body["blocks"])
    data = libipld.decode_dag_cbor(blocks[roots[0]])["data"]
    raw = body["ops"][0]
    other = cid_for_dag_cbor(b"\xa0")
    absent = _absent_key_within_proof(blocks, data, raw["path"])
    bad = [
        [Op("update", raw["path"], other, raw["prev"])],  # current value is not cid
        [Op("create", raw["path"], other)],  # created value differs
        [Op("delete", raw["path"], None, raw["prev"])],  # deleted key still present
        [Op("create", absent, raw["cid"])],  # created key absent
        [Op("update", raw["path"], raw["cid"], None)],  # update without prev
        [Op("update", "no-slash", raw["cid"], raw["prev"])],  # invalid path
    ]
    for ops in bad:
        with pytest.raises(MstError):
            mst.invert_ops(data, ops, blocks)


def test_decode_node_rejects_malformed() -> None:
    link = cid_for_dag_cbor(b"\xa0")
    good = {"e": [{"k": b"a/b", "p": 0, "t": None, "v": link}, {"k": b"d", "p": 2, "t": None, "v": link}], "l": None}
    assert [e.key for e in mst.decode_node(libipld.encode_dag_cbor(good), height=0).entries] == [b"a/b", b"a/d"]

    def entry(**changes: object) -> dict:
        return {**{"k": b"a/b", "p": 0, "t": None, "v": link}, **changes}

    bad: list[object] = [
        [],
        {"e": []},
        {"e": [], "l": None, "x": 1},
        {"e": {}, "l": None},
        {"e": [], "l": b"not a cid"},
        {"e": [entry(p="0")], "l": None},
        {"e": [entry(p=True)], "l": None},
        {"e": [entry(k="a/b")], "l": None},
        {"e": [entry(k=b"")], "l": None},
        {"e": [entry(k=b"no-slash")], "l": None},
        {"e": [entry(k=b"a/b/c")], "l": None},
        {"e": [entry(k=b"a/..")], "l": None},
        {"e": [entry(p=1)], "l": None},
        {"e": [entry(v=None)], "l": None},
        {"e": [entry(v="x")], "l": None},
        {"e": [entry(t=b"\x01\x55\x12\x20" + bytes(32))], "l": None},
        {"e": [{"k": b"a/b", "p": 0, "v": link}], "l": None},
        {"e": [entry(), entry(k=b"a", p=0)], "l": None},  # out of order
        {"e": [entry(), entry(k=b"b", p=4)], "l": None},  # prefix longer than previous key
        {"e": [entry(), entry(k=b"/b", p=1)], "l": None},  # prefix not maximal, and a duplicate
        {"e": [entry(k=b"a/d"), entry(k=b"/e", p=1)], "l": None},  # prefix not maximal
        {"e": [entry(), entry(k=b"c", p=2)], "l": None},  # heights 0 and 1 in one node
        {"e": [entry(t=link)], "l": None},  # a subtree below height 0
        {"e": [entry()], "l": link},  # a subtree below height 0
    ]
    for obj in bad:
        with pytest.raises(MstError):
            mst.decode_node(libipld.encode_dag_cbor(obj))
    with pytest.raises(MstError):
        mst.decode_node(b"\xff")
    with pytest.raises(MstError):
        mst.decode_node(libipld.encode_dag_cbor(good), height=5)


def test_empty_tree() -> None:
    root, blocks = mst.build([])
    assert cid_to_str(root) == "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
    assert list(mst.walk(blocks, root)) == []
    link = cid_for_dag_cbor(b"\xa0")
    one, new = mst.apply(blocks, root, [Op("create", "a/b", link)])
    assert mst.invert_ops(one, [Op("create", "a/b", link)], new) == root
    assert mst.diff({**blocks, **new}, root, one)[0] == [Op("create", "a/b", link)]
    with pytest.raises(MissingBlock):
        mst.get({}, root, "a/b")


def test_created_key_at_the_wrong_height_is_rejected() -> None:
    # "a/c" has height 1; a PDS that puts it in the height-0 node beside "a/b" and "a/d" makes
    # a tree whose inversion would otherwise give back the honest previous tree
    link = cid_for_dag_cbor(b"\xa0")
    assert [mst.key_height(k) for k in ("a/b", "a/c", "a/d")] == [0, 1, 0]
    prev_root, _ = mst.build([("a/b", link), ("a/d", link)])
    entries = tuple(mst.Entry(k, link) for k in (b"a/b", b"a/c", b"a/d"))
    block = mst.encode_node(mst.Node(None, entries))
    bad_root = cid_for_dag_cbor(block)
    ops = [Op("create", "a/c", link)]
    for strict in (False, True):
        with pytest.raises(MstError):
            mst.invert_ops(bad_root, ops, {bad_root: block}, strict=strict)
    with pytest.raises(MstError):
        list(mst.walk({bad_root: block}, bad_root))
    assert prev_root != bad_root
