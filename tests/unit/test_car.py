"""CAR v1 reader and writer: round trips, hash checks, hostile inputs, real repository exports."""

from __future__ import annotations

from pathlib import Path

import libipld
import pytest

from protocol.car import CarFile, iter_car_blocks, read_car, write_car
from protocol.cid import cid_for_dag_cbor, cid_for_raw, encode_varint, verify_block
from protocol.dagcbor import CID, decode, encode
from protocol.errors import BlockHashMismatch, CarError
from tests.support.testdata import refpds_did_of, refpds_repo_cars

BLOCKS = [encode({"n": i, "pad": b"x" * (i * 50)}) for i in range(5)]
CIDS = [cid_for_dag_cbor(block) for block in BLOCKS]
ROOT = CIDS[0]


def _header(obj: object) -> bytes:
    body = encode(obj)
    return encode_varint(len(body)) + body


GOOD_HEADER = _header({"version": 1, "roots": [CID(ROOT)]})


def _section(cid: bytes, block: bytes) -> bytes:
    return encode_varint(len(cid) + len(block)) + cid + block


def _car(*sections: bytes, header: bytes = GOOD_HEADER) -> bytes:
    return header + b"".join(sections)


def test_round_trip_keeps_roots_blocks_and_order() -> None:
    data = write_car([ROOT], zip(CIDS, BLOCKS, strict=True))
    car = read_car(data)
    assert isinstance(car, CarFile)
    assert car.roots == (ROOT,)
    assert list(car.blocks) == CIDS
    assert list(car.blocks.values()) == BLOCKS
    assert data.startswith(GOOD_HEADER)
    # libipld reads what we write
    header, blocks = libipld.decode_car(data)
    assert header == {"version": 1, "roots": [ROOT]}
    assert set(blocks) == set(CIDS)


def test_raw_blocks_empty_roots_and_empty_blocks() -> None:
    raw = b"blob bytes"
    empty = b""
    data = write_car([], [(cid_for_raw(raw), raw), (cid_for_raw(empty), empty)])
    car = read_car(data)
    assert car.roots == ()
    assert car.blocks == {cid_for_raw(raw): raw, cid_for_raw(empty): empty}
    assert read_car(write_car([ROOT], [])).blocks == {}


def test_header_is_canonical_dag_cbor_with_links() -> None:
    data = write_car([ROOT, CIDS[1]], [])
    length = data[0]
    header = decode(data[1 : 1 + length])
    assert header == {"roots": [CID(ROOT), CID(CIDS[1])], "version": 1}
    assert encode(header) == data[1 : 1 + length]


def test_iter_car_blocks_yields_good_blocks_then_raises() -> None:
    tampered = BLOCKS[2][:-1] + b"\x00"
    data = _car(*(_section(c, b) for c, b in zip(CIDS[:2], BLOCKS[:2], strict=True)), _section(CIDS[2], tampered))
    seen = []
    with pytest.raises(BlockHashMismatch):
        for cid, _block in iter_car_blocks(data):
            seen.append(cid)
    assert seen == CIDS[:2]


def test_duplicate_block_is_accepted_once() -> None:
    data = _car(_section(CIDS[0], BLOCKS[0]), _section(CIDS[1], BLOCKS[1]), _section(CIDS[0], BLOCKS[0]))
    assert list(read_car(data).blocks) == CIDS[:2]


@pytest.mark.parametrize("index", range(5))
def test_every_block_hash_is_checked(index: int) -> None:
    blocks = list(BLOCKS)
    blocks[index] = blocks[index][:-1] + bytes([blocks[index][-1] ^ 1])
    data = write_car([ROOT], zip(CIDS, blocks, strict=True))
    with pytest.raises(BlockHashMismatch) as info:
        read_car(data)
    assert info.value.reason == "bad_block_hash"
    assert isinstance(info.value, CarError)


def test_block_under_the_wrong_cid_kind_is_a_mismatch() -> None:
    # the raw-codec CID of the same bytes has the same digest: accepted (codec is not checked)
    assert read_car(_car(_section(cid_for_raw(BLOCKS[0]), BLOCKS[0]))).blocks
    other = cid_for_dag_cbor(b"other")
    with pytest.raises(BlockHashMismatch):
        read_car(_car(_section(other, BLOCKS[0])))


_BAD_CID_V0 = b"\x12\x20" + b"\x00" * 32
_BAD_CID_CODEC = b"\x01\x70\x12\x20" + b"\x00" * 32
_BAD_CID_HASH = b"\x01\x71\x13\x40" + b"\x00" * 64
_SECTION = _section(CIDS[0], BLOCKS[0])

HOSTILE = [
    (b"", "empty input"),
    (b"\x80", "truncated header varint"),
    (b"\x80\x00", "non-minimal header varint"),
    (b"\xff" * 12, "overlong header varint"),
    (b"\x00", "zero-length header"),
    (b"\xff\xff\xff\xff\x0f" + b"\xa0", "header length beyond input"),
    (b"\x05\xa0", "header truncated"),
    (b"\x01\xff", "header not CBOR"),
    (_header([1]), "header not a map"),
    (_header({"version": 2, "roots": [CID(ROOT)]}), "version 2"),
    (_header({"version": True, "roots": [CID(ROOT)]}), "version true"),
    (_header({"roots": [CID(ROOT)]}), "version missing"),
    (_header({"version": 1}), "roots missing"),
    (_header({"version": 1, "roots": CID(ROOT)}), "roots not a list"),
    (_header({"version": 1, "roots": ["bafy"]}), "root not a link"),
    (_header({"version": 1, "roots": [b"\x01\x71\x12\x20\x00"]}), "root not a valid CID"),
    (GOOD_HEADER + b"\x80", "truncated section varint"),
    (GOOD_HEADER + b"\xb9\x80", "truncated two-byte section varint"),
    (GOOD_HEADER + b"\xb9\x00" + _SECTION[2:], "non-minimal section varint"),
    (GOOD_HEADER + b"\xff" * 10, "overlong section varint"),
    (GOOD_HEADER + b"\x00", "zero-length section"),
    (GOOD_HEADER + _SECTION + b"\x00", "zero-length section after a block"),
    (GOOD_HEADER + b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "huge section length"),
    (GOOD_HEADER + b"\xff\xff\xff\x7f" + b"\x00" * 64, "section length beyond input"),
    (GOOD_HEADER + _SECTION[:-1], "truncated block"),
    (GOOD_HEADER + _SECTION[:20], "truncated inside the CID"),
    (GOOD_HEADER + encode_varint(20) + CIDS[0][:20], "section shorter than its CID"),
    (GOOD_HEADER + _section(_BAD_CID_V0, b"\xa0"), "CIDv0 block"),
    (GOOD_HEADER + _section(_BAD_CID_CODEC, b"\xa0"), "unsupported codec"),
    (GOOD_HEADER + _section(_BAD_CID_HASH, b"\xa0"), "unsupported hash"),
    (GOOD_HEADER + _section(b"\x02\x71\x12\x20" + b"\x00" * 32, b""), "CID version 2"),
    (GOOD_HEADER + _section(b"\x01\x71\x12\xff\xff\xff\xff\x0f", b""), "CID digest size huge"),
    (GOOD_HEADER + encode_varint(3) + b"\x01\x80\x80", "CID varint truncated in section"),
]


@pytest.mark.parametrize(("data", "case"), HOSTILE, ids=[case for _, case in HOSTILE])
def test_hostile_input_raises_car_error(data: bytes, case: str) -> None:
    with pytest.raises(CarError):
        read_car(data)
    with pytest.raises(CarError):
        list(iter_car_blocks(data))


def test_block_size_limit() -> None:
    big = encode(b"x" * 1000)
    data = write_car([ROOT], [(cid_for_dag_cbor(big), big)])
    assert read_car(data, max_block_bytes=len(big)).blocks
    with pytest.raises(CarError) as info:
        read_car(data, max_block_bytes=len(big) - 1)
    assert info.value.reason == "too_large"


def test_block_count_limit() -> None:
    data = write_car([ROOT], zip(CIDS, BLOCKS, strict=True))
    assert len(read_car(data, max_blocks=5).blocks) == 5
    with pytest.raises(CarError) as info:
        read_car(data, max_blocks=4)
    assert info.value.reason == "too_large"


def test_many_tiny_sections_are_bounded_by_max_blocks() -> None:
    empty = cid_for_raw(b"")
    data = GOOD_HEADER + _section(empty, b"") * 20_000
    with pytest.raises(CarError):
        read_car(data)


def test_write_car_refuses_bad_cids() -> None:
    with pytest.raises(CarError):
        write_car([b"\x01\x02"], [])
    with pytest.raises(CarError):
        write_car([ROOT], [(b"\x12\x20" + b"\x00" * 32, b"")])


def test_read_car_accepts_memoryview() -> None:
    data = write_car([ROOT], zip(CIDS, BLOCKS, strict=True))
    assert read_car(memoryview(data)).blocks == read_car(data).blocks


@pytest.mark.parametrize("path", refpds_repo_cars(), ids=lambda path: path.stem)
def test_reference_pds_repo_exports(path: Path) -> None:
    data = path.read_bytes()
    car = read_car(data)
    assert len(car.roots) == 1
    assert all(root in car.blocks for root in car.roots)
    assert all(verify_block(cid, block) for cid, block in car.blocks.items())
    _, ipld_blocks = libipld.decode_car(data)
    assert set(car.blocks) == set(ipld_blocks)
    assert len(car.blocks) >= 5
    commit = decode(car.blocks[car.roots[0]])
    assert commit["version"] == 3
    assert commit["did"] == refpds_did_of(path)
    assert write_car(car.roots, car.blocks.items()) == data
