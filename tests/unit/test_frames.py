"""Firehose frames: reference frames round-trip byte for byte; hostile frames raise typed errors fast."""

from __future__ import annotations

import libipld
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameError, FrameTooLarge, ProtocolError, UnknownFrameType
from protocol.frames import (
    AccountEvent,
    CommitEvent,
    ErrorFrame,
    IdentityEvent,
    InfoEvent,
    SyncEvent,
    decode_frame,
    encode_frame,
    error_frame,
    info_frame,
)
from tests.support.testdata import refpds_frame_seqs, refpds_frames, refpds_manifest, refpds_replayed_frames


def test_reference_frames_decode_and_reencode_identically() -> None:
    kinds = {"#commit": CommitEvent, "#sync": SyncEvent, "#identity": IdentityEvent, "#account": AccountEvent}
    frames = refpds_frames()
    assert [row["seq"] for row, _ in frames] == refpds_frame_seqs()  # every frame the scenario caused
    assert {str(row["t"]) for row, _ in frames} == set(kinds)
    for row, raw in frames:
        event = decode_frame(raw)
        assert isinstance(event, kinds[str(row["t"])])
        assert event.seq == row["seq"]
        assert encode_frame(event) == raw


def test_replay_is_the_live_firehose_without_the_deleted_accounts_earlier_frames() -> None:
    """What a late subscriber of the reference PDS gets: the same bytes, minus a purged account."""
    live = {int(str(row["seq"])): raw for row, raw in refpds_frames()}
    replayed = refpds_replayed_frames()
    (deletion,) = [step for step in refpds_manifest()["steps"] if step["step"] == "delete account"]
    purged = {seq for seq, raw in live.items() if decode_frame(raw).did == deletion["did"]} - set(deletion["seqs"])
    assert purged  # the deleted account had frames before its deletion
    assert [row["seq"] for row, _ in replayed] == sorted(set(live) - purged)
    for row, raw in replayed:
        assert raw == live[int(str(row["seq"]))]


def test_resequencing_changes_only_seq() -> None:
    for _, raw in refpds_frames():
        event = decode_frame(raw)
        header, body = libipld.decode_dag_cbor_multi(raw)
        new_header, new_body = libipld.decode_dag_cbor_multi(encode_frame(event, 987654))
        assert new_header == header
        assert new_body == {**body, "seq": 987654}


def test_error_and_info_frames() -> None:
    err = decode_frame(error_frame("FutureCursor", "cursor in the future"))
    assert err == ErrorFrame("FutureCursor", "cursor in the future")
    info = decode_frame(info_frame("OutdatedCursor"))
    assert info == InfoEvent("OutdatedCursor", None)


def frame(header: object, body: object) -> bytes:
    return bytes(libipld.encode_dag_cbor(header)) + bytes(libipld.encode_dag_cbor(body))


def test_unknown_type_is_reported_as_such() -> None:
    with pytest.raises(UnknownFrameType) as info:
        decode_frame(frame({"op": 1, "t": "#labels"}, {"seq": 1}))
    assert info.value.reason == "unknown_type"


@pytest.mark.parametrize(
    ("header", "body", "reason"),
    [
        ({"op": 2, "t": "#commit"}, {}, "bad_header"),
        ({"op": 1}, {}, "bad_header"),
        ({"op": 1, "t": "#identity"}, {"seq": "1", "did": "did:plc:x", "time": "t"}, "bad_field"),
        ({"op": 1, "t": "#identity"}, {"seq": -1, "did": "did:plc:x", "time": "t"}, "bad_field"),
        ({"op": 1, "t": "#identity"}, {"seq": 1, "did": "not-a-did", "time": "t"}, "bad_did"),
        ({"op": 1, "t": "#account"}, {"seq": 1, "did": "did:plc:x", "time": "t", "active": 1}, "bad_field"),
        ({"op": 1, "t": "#sync"}, {"seq": 1, "did": "did:plc:x", "time": "t", "rev": "r", "blocks": "x"}, "bad_field"),
        ({"op": 1, "t": "#identity"}, {"seq": 1.5, "did": "did:plc:x", "time": "t"}, "bad_field"),
    ],
)
def test_malformed_bodies_raise_typed_errors(header: object, body: object, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(frame(header, body))
    assert info.value.reason == reason


def test_too_many_ops_and_oversized_frames() -> None:
    commit = next(raw for row, raw in refpds_frames() if row["t"] == "#commit")
    header, body = libipld.decode_dag_cbor_multi(commit)
    op = {"action": "delete", "path": "app.bsky.feed.post/x", "cid": None}
    with pytest.raises(FrameTooLarge):
        decode_frame(frame(header, {**body, "ops": [op] * 201}))
    with pytest.raises(FrameTooLarge):
        decode_frame(commit, max_bytes=len(commit) - 1)


def test_truncated_frames_at_every_offset() -> None:
    for _, raw in refpds_frames()[:6]:
        for cut in range(len(raw)):
            with pytest.raises(ProtocolError):
                decode_frame(raw[:cut])


def test_hostile_encodings() -> None:
    cases = [
        b"\xa2\x61b\x01\x61a\x02" + b"\xa0",  # non-canonical key order in the header
        b"\xbf\x61a\x01\xff\xa0",  # indefinite-length map
        b"\x5b" + (2**62).to_bytes(8, "big") + b"abc",  # huge declared length
        b"\x81" * 100_000 + b"\x00",  # deep nesting
        b"\xa1\x61t\xc1\x00\xa0",  # a tag other than 42
        b"",
    ]
    for data in cases:
        with pytest.raises(FrameError):
            decode_frame(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode_frame(data)
    except ProtocolError:
        pass


def _commit_frame_with_ops(ops: list[object]) -> bytes:
    from protocol.crypto import PrivateKey
    from protocol.repo_writer import RepoWriter, Write

    writer = RepoWriter("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", PrivateKey.generate("k256"))
    writer.commit([], 1)
    event = writer.commit([Write("create", "app.bsky.feed.post/3k00000000001", {"text": "x"})], 2)
    header, body = libipld.decode_dag_cbor_multi(encode_frame(event))
    return frame(header, {**body, "ops": ops})


@pytest.mark.parametrize("action", [["create"], {"a": "create"}, 1, None, b"create", True])
def test_an_op_action_of_any_other_type_is_a_typed_error(action: object) -> None:
    # a list or a map used to raise TypeError (unhashable) out of the parser (issue 7, item 7)
    op = {"action": action, "path": "app.bsky.feed.post/3k00000000001", "cid": None}
    with pytest.raises(FrameError) as info:
        decode_frame(_commit_frame_with_ops([op]))
    assert info.value.reason == "bad_field"


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["action", "path", "cid", "prev"]), _VALUES), max_size=3) | _VALUES)
def test_any_ops_value_is_parsed_or_a_typed_error(ops: object) -> None:
    try:
        decode_frame(_commit_frame_with_ops(ops))  # type: ignore[arg-type]
    except ProtocolError:
        pass


def test_peek_seq_finds_the_seq_of_a_frame_that_failed_typed_parsing() -> None:
    from protocol.frames import peek_seq

    bad_op = _commit_frame_with_ops([{"action": ["create"], "path": "a/b", "cid": None}])
    assert peek_seq(bad_op) == 2
    assert peek_seq(frame({"op": 1, "t": "#identity"}, {"seq": 7, "did": 5})) == 7
    for data in (b"garbage", frame({"op": 1}, {"seq": "7"}), frame({"op": 1}, {"seq": True}), frame({}, [1])):
        assert peek_seq(data) is None
