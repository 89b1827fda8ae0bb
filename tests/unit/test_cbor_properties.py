"""Property tests: strict codec round trips, agreement with libipld, CAR round trips."""

from __future__ import annotations

from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from protocol import cbor
from protocol.car import read_car, write_car
from protocol.cid import (
    CODEC_DAG_CBOR,
    CODEC_RAW,
    HASH_SHA256,
    SHA256_LEN,
    cid_for_raw,
    parse_cid,
    verify_block,
)
from protocol.dagcbor import CID, INT_MAX, INT_MIN, decode, encode, from_json, to_json
from protocol.errors import BlockHashMismatch, CarError, CborError, CidError

links = st.builds(
    lambda codec, digest: CID(bytes((1, codec, HASH_SHA256, SHA256_LEN)) + digest),
    st.sampled_from([CODEC_DAG_CBOR, CODEC_RAW]),
    st.binary(min_size=32, max_size=32),
)
# Keys beginning with "$" carry data-model meaning in the JSON form ($link, $bytes, $type).
keys = st.text(max_size=12).filter(lambda key: not key.startswith("$"))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT_MIN, max_value=INT_MAX)
    | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, INT_MAX, INT_MIN, -1, -24, -25])
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | links
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)
objects = st.dictionaries(keys, values, max_size=6)


def _is_cid(raw: bytes) -> bool:
    try:
        parse_cid(raw)
    except CidError:
        return False
    return True


def _plain(value: Any) -> Any:
    """The value as libipld sees it: links as plain bytes."""
    if isinstance(value, CID):
        return value.binary
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _has_cid_like_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return _is_cid(value)
    if isinstance(value, list):
        return any(_has_cid_like_bytes(item) for item in value)
    if isinstance(value, dict):
        return any(_has_cid_like_bytes(item) for item in value.values())
    return False


@given(values)
def test_strict_round_trip(value: Any) -> None:
    data = encode(value)
    assert decode(data) == value
    assert encode(decode(data)) == data


@given(values)
def test_libipld_agrees_with_strict_codec(value: Any) -> None:
    assume(not _has_cid_like_bytes(value))  # libipld would encode such bytes as a link
    data = encode(value)
    assert cbor.decode(data) == _plain(value)
    assert cbor.encode(_plain(value)) == data


@given(objects)
def test_json_form_round_trip(obj: dict[str, Any]) -> None:
    json_form = to_json(obj)
    assert from_json(json_form) == obj
    assert encode(from_json(json_form)) == encode(obj)


@given(st.binary(max_size=64))
def test_strict_decoder_accepts_only_canonical_bytes(data: bytes) -> None:
    try:
        value = decode(data)
    except CborError:
        return
    assert encode(value) == data
    assert cbor.decode(data) == _plain(value)


@given(values, st.data())
def test_mutated_encodings_fail_cleanly_or_stay_canonical(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(encode(value))
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[index] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    for candidate in (bytes(encoded), bytes(encoded[:cut])):
        try:
            decoded = decode(candidate)
        except CborError:
            continue
        assert encode(decoded) == candidate


blocks_lists = st.lists(st.binary(max_size=300), max_size=8)


@given(blocks_lists, st.integers(min_value=0, max_value=3))
def test_car_round_trip(raw_blocks: list[bytes], root_count: int) -> None:
    pairs = [(cid_for_raw(block), block) for block in raw_blocks]
    roots = [cid for cid, _ in pairs[:root_count]] or [cid_for_raw(b"root")]
    car = read_car(write_car(roots, pairs))
    assert car.roots == tuple(roots)
    assert car.blocks == dict(pairs)
    assert list(car.blocks) == list(dict(pairs))


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5), st.data())
def test_car_corruption_is_detected(raw_blocks: list[bytes], data: st.DataObject) -> None:
    pairs = [(cid_for_raw(block), block) for block in raw_blocks]
    encoded = bytearray(write_car([pairs[0][0]], pairs))
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[index] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        car = read_car(bytes(encoded))
    except (CarError, BlockHashMismatch):
        return
    # A flip that still parses hit the header's root or a CID's codec byte (raw <-> dag-cbor
    # share the digest): the block bytes themselves can never change unnoticed.
    assert all(verify_block(cid, block) for cid, block in car.blocks.items())
    assert set(car.blocks.values()) == set(raw_blocks)
