"""MST properties on random trees: edits keep the canonical shape, diff, proofs and inversion."""

from __future__ import annotations

import random

import libipld
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import mst
from protocol.cid import cid_for_dag_cbor
from protocol.errors import MissingBlock, MstError
from protocol.mst import Op

VALUES = [cid_for_dag_cbor(bytes([0xA1, 0x61, 0x78, i])) for i in range(4)]
COLLECTIONS = ["app.bsky.feed.post", "app.bsky.feed.like", "a.b", "a.bc"]

keys = st.builds(
    lambda c, r: f"{c}/{r}",
    st.sampled_from(COLLECTIONS),
    st.text(alphabet="abz019-_~:.", min_size=1, max_size=6).filter(lambda r: r not in (".", "..")),
)
values = st.sampled_from(VALUES)
trees = st.dictionaries(keys, values, max_size=80)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _commit_ops(rng: random.Random, before: dict[str, bytes], fresh: list[str]) -> list[Op]:
    """A random commit's ops (each path once) turning ``before`` into something else."""
    ops = []
    for key, value in before.items():
        roll = rng.random()
        if roll < 0.2:
            ops.append(Op("delete", key, None, value))
        elif roll < 0.3:
            ops.append(Op("update", key, rng.choice([v for v in VALUES if v != value]), value))
    ops += [Op("create", key, rng.choice(VALUES)) for key in dict.fromkeys(fresh) if key not in before]
    rng.shuffle(ops)
    return ops


def _after(before: dict[str, bytes], ops: list[Op]) -> dict[str, bytes]:
    after = dict(before)
    for op in ops:
        if op.action == "delete":
            del after[op.path]
        else:
            assert op.cid is not None
            after[op.path] = op.cid
    return after


@SETTINGS
@given(trees, st.lists(st.tuples(keys, values, st.booleans()), max_size=60))
def test_incremental_edits_equal_build(start: dict[str, bytes], edits: list[tuple[str, bytes, bool]]) -> None:
    root, blocks = mst.build(start)
    current = dict(start)
    for key, value, remove in edits:
        if remove and key in current:
            op = Op("delete", key, None, current.pop(key))
        elif key in current:
            op = Op("update", key, value, current[key])
            current[key] = value
        else:
            op = Op("create", key, value)
            current[key] = value
        root, new = mst.apply(blocks, root, [op])
        blocks.update(new)
    expected_root, expected_blocks = mst.build(current)
    assert root == expected_root
    assert list(mst.walk(blocks, root)) == sorted(current.items())
    for key, value in current.items():
        assert mst.get(blocks, root, key) == value
    for cid, block in expected_blocks.items():
        assert blocks[cid] == block
        assert mst.encode_node(mst.decode_node(block)) == block


@SETTINGS
@given(trees, trees)
def test_diff_applied_yields_the_other_tree(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    root_a, blocks_a = mst.build(a)
    root_b, blocks_b = mst.build(b)
    blocks = {**blocks_a, **blocks_b}
    ops, new_blocks = mst.diff(blocks, root_a, root_b)
    assert [op.path for op in ops] == sorted({k for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
    assert set(new_blocks) == set(blocks_b) - set(blocks_a)
    root, _ = mst.apply(blocks_a, root_a, ops)
    assert root == root_b
    assert mst.invert_ops(root_b, ops, blocks_b) == root_a


@SETTINGS
@given(trees, st.lists(keys, max_size=6), st.randoms(use_true_random=False))
def test_inversion_with_proof_blocks_only(before: dict[str, bytes], fresh: list[str], rng: random.Random) -> None:
    root_before, blocks = mst.build(before)
    ops = _commit_ops(rng, before, fresh)
    root_after, new_blocks = mst.apply(blocks, root_before, ops)
    assert root_after == mst.build(_after(before, ops))[0]
    everything = {**blocks, **new_blocks}
    proof_cids = mst.proof_blocks(everything, root_after, [op.path for op in ops])
    proof = {cid: everything[cid] for cid in proof_cids}
    assert mst.invert_ops(root_after, ops, proof) == root_before
    assert mst.invert_ops(root_after, list(reversed(ops)), proof) == root_before

    # without a block it needs, inversion raises MissingBlock; it never returns a wrong root
    with_missing = dict(proof)
    del with_missing[root_after]
    try:
        mst.invert_ops(root_after, ops, with_missing)
        raise AssertionError("inversion without the root block did not raise")
    except MissingBlock:
        pass
    for cid in proof_cids:
        short = {c: blk for c, blk in proof.items() if c != cid}
        try:
            assert mst.invert_ops(root_after, ops, short) == root_before
        except MissingBlock:
            pass


@SETTINGS
@given(trees, st.randoms(use_true_random=False))
def test_inversion_rejects_a_wrong_op_list(before: dict[str, bytes], rng: random.Random) -> None:
    root_before, blocks = mst.build(before)
    ops = _commit_ops(rng, before, ["zz.top/new"])
    root_after, new_blocks = mst.apply(blocks, root_before, ops)
    everything = {**blocks, **new_blocks}
    dropped = ops[1:]
    if ops:
        try:
            assert mst.invert_ops(root_after, dropped, everything) != root_before
        except MstError:
            pass


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.binary(max_size=40) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("eklptv"), inner, max_size=4),
    max_leaves=8,
)


@SETTINGS
@given(trees, st.randoms(use_true_random=False), st.data())
def test_inversion_of_corrupt_blocks_raises_protocol_errors_only(
    before: dict[str, bytes], rng: random.Random, data: st.DataObject
) -> None:
    root_before, blocks = mst.build(before)
    ops = _commit_ops(rng, before, ["zz.top/new"])
    root_after, new_blocks = mst.apply(blocks, root_before, ops)
    everything = {**blocks, **new_blocks}
    proof = {c: everything[c] for c in mst.proof_blocks(everything, root_after, [op.path for op in ops])}
    target = data.draw(st.sampled_from(sorted(proof)))
    node = libipld.decode_dag_cbor(proof[target])
    where = data.draw(st.sampled_from(["l", "e", *(f"e.{i}.{f}" for i in range(len(node["e"])) for f in "kptv")]))
    if where in ("l", "e"):
        node[where] = data.draw(junk)
    else:
        _, i, field = where.split(".")
        node["e"][int(i)][field] = data.draw(junk)
    proof[target] = libipld.encode_dag_cbor(node)
    for strict in (False, True):
        try:
            result = mst.invert_ops(root_after, ops, proof, strict=strict)
        except (MstError, MissingBlock):
            continue
        assert isinstance(result, bytes)
