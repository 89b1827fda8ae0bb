"""Strict DAG-CBOR codec: exact encodings, every rejection rule, JSON form edge cases."""

from __future__ import annotations

import pytest

from protocol.cid import cid_for_dag_cbor, cid_for_raw, cid_to_str
from protocol.dagcbor import (
    CID,
    INT_MAX,
    INT_MIN,
    MAX_DEPTH,
    check_data_model,
    decode,
    encode,
    from_json,
    to_json,
)
from protocol.errors import CborError, CidError

LINK = CID(cid_for_dag_cbor(b"\xa0"))
LINK_HEX = "d82a5825" + "00" + LINK.binary.hex()


@pytest.mark.parametrize(
    ("value", "hex_"),
    [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (255, "18ff"),
        (256, "190100"),
        (65535, "19ffff"),
        (65536, "1a00010000"),
        (2**32, "1b0000000100000000"),
        (INT_MAX, "1b7fffffffffffffff"),
        (-1, "20"),
        (-25, "3818"),
        (INT_MIN, "3b7fffffffffffffff"),
        (False, "f4"),
        (True, "f5"),
        (None, "f6"),
        ("", "60"),
        ("a", "6161"),
        ("ñ", "62c3b1"),
        (b"", "40"),
        (b"\x01\x02", "420102"),
        ([], "80"),
        ([1, [2]], "82018102"),
        ({}, "a0"),
        ({"b": 1, "a": 2, "aa": 3}, "a3616102616201626161 03".replace(" ", "")),
        (LINK, LINK_HEX),
    ],
)
def test_encode_and_decode_exact_bytes(value: object, hex_: str) -> None:
    assert encode(value).hex() == hex_
    decoded = decode(bytes.fromhex(hex_))
    assert decoded == value
    assert type(decoded) is type(value)


def test_decoded_link_is_a_cid_with_base32_string() -> None:
    decoded = decode(bytes.fromhex("a1616c" + LINK_HEX))
    assert isinstance(decoded["l"], CID)
    assert str(decoded["l"]) == cid_to_str(LINK.binary)
    assert str(decoded["l"]).startswith("bafyrei")
    assert bytes(decoded["l"]) == LINK.binary
    assert CID.from_str(str(LINK)) == LINK
    assert repr(LINK).startswith("CID('bafyrei")


def test_cid_rejects_invalid_binary() -> None:
    with pytest.raises(CidError):
        CID(b"\x01\x71\x12\x20" + b"\x00" * 31)
    with pytest.raises(CidError):
        CID(b"\x12\x20" + b"\x00" * 32)  # CIDv0
    with pytest.raises(CidError):
        CID("bafy")  # type: ignore[arg-type]


def test_raw_codec_links_are_accepted() -> None:
    link = CID(cid_for_raw(b"blob"))
    assert decode(encode([link])) == [link]
    assert str(link).startswith("bafkrei")


REJECTED = [
    ("", "empty input"),
    ("18", "truncated integer argument"),
    ("19ff", "truncated 2-byte argument"),
    ("1817", "non-minimal 1-byte integer"),
    ("1900ff", "non-minimal 2-byte integer"),
    ("1a0000ffff", "non-minimal 4-byte integer"),
    ("1b00000000ffffffff", "non-minimal 8-byte integer"),
    ("3817", "non-minimal negative integer"),
    ("5800", "non-minimal byte string length"),
    ("780161", "non-minimal text length"),
    ("9800", "non-minimal array length"),
    ("b800", "non-minimal map length"),
    ("d9002a" + LINK_HEX[4:], "non-minimal tag 42"),
    ("1b8000000000000000", "integer above int64"),
    ("3b8000000000000000", "integer below int64"),
    ("1c", "reserved additional information 28"),
    ("1e", "reserved additional information 30"),
    ("5f4100ff", "indefinite byte string"),
    ("7f6161ff", "indefinite text string"),
    ("9f00ff", "indefinite array"),
    ("bf616100ff", "indefinite map"),
    ("f93c00", "half float"),
    ("fa3f800000", "single float"),
    ("fb3ff0000000000000", "double float"),
    ("fb0000000000000000", "double zero"),
    ("f7", "undefined"),
    ("e0", "simple value 0"),
    ("f3", "simple value 19"),
    ("f820", "one-byte simple value"),
    ("ff", "break outside indefinite item"),
    ("c000", "tag 0"),
    ("d82b4100", "tag 43"),
    ("d82a6161", "tag 42 wrapping text"),
    ("d82a40", "tag 42 wrapping empty bytes"),
    ("d82a5824" + LINK.binary.hex(), "tag 42 without the 0x00 prefix"),
    ("d82a5824" + "00" + LINK.binary.hex()[:-2], "tag 42 with a short CID"),
    ("d82a5823" + "00" + "1220" + "00" * 32, "tag 42 wrapping a CIDv0"),
    ("d82a5825" + "00" + "01701220" + "00" * 32, "tag 42 with an unsupported codec"),
    ("d82ad82a" + LINK_HEX[4:], "nested tag"),
    ("a10101", "integer map key"),
    ("a1410101", "byte string map key"),
    ("a2616201616102", "keys out of bytewise order"),
    ("a262616101616202", "longer key before shorter key"),
    ("a2616101616102", "duplicate keys"),
    ("62c328", "invalid UTF-8"),
    ("63eda080", "UTF-8 encoded surrogate"),
    ("62c0af", "overlong UTF-8"),
    ("0000", "trailing bytes"),
    ("a0a0", "trailing map"),
    ("6261", "truncated text"),
    ("4301", "truncated bytes"),
    ("8201", "truncated array"),
    ("a16161", "truncated map"),
    ("5b7fffffffffffffff", "huge byte string length"),
    ("7b7fffffffffffffff", "huge text length"),
    ("9bffffffffffffffff", "huge array length"),
    ("bbffffffffffffffff", "huge map length"),
    ("9a7fffffff" + "00" * 16, "array length beyond remaining input"),
    ("ba7fffffff" + "00" * 16, "map length beyond remaining input"),
]


@pytest.mark.parametrize(("hex_", "case"), REJECTED, ids=[case for _, case in REJECTED])
def test_rejects_invalid_encodings(hex_: str, case: str) -> None:
    with pytest.raises(CborError) as info:
        decode(bytes.fromhex(hex_))
    assert info.value.reason == "bad_cbor", case


def test_nesting_depth_bound() -> None:
    assert decode(bytes.fromhex("81" * MAX_DEPTH + "00")) is not None
    with pytest.raises(CborError) as info:
        decode(bytes.fromhex("81" * (MAX_DEPTH + 1) + "00"))
    assert info.value.reason == "too_deep"
    with pytest.raises(CborError) as info:
        decode(bytes.fromhex("a16161" * 3 + "00"), max_depth=2)
    assert info.value.reason == "too_deep"
    # a deeply nested hostile input fails at the bound, not with RecursionError
    with pytest.raises(CborError):
        decode(b"\x81" * 100_000)


def test_size_bound() -> None:
    data = encode(b"x" * 100)
    assert decode(data, max_bytes=len(data)) == b"x" * 100
    with pytest.raises(CborError) as info:
        decode(data, max_bytes=len(data) - 1)
    assert info.value.reason == "too_large"


def test_decode_accepts_memoryview_and_bytearray() -> None:
    data = encode({"a": [1, b"\x00"]})
    assert decode(memoryview(data)) == decode(bytearray(data)) == {"a": [1, b"\x00"]}


def test_encode_sorts_keys_length_first() -> None:
    value = {"ccc": 1, "bb": 2, "a": 3, "ab": 4, "\u00e9": 5}
    data = encode(value)
    # "é" is two UTF-8 bytes: it sorts with the 2-byte keys, after "ab" and "bb"
    assert list(decode(data)) == ["a", "ab", "bb", "\u00e9", "ccc"]
    assert encode(dict(reversed(value.items()))) == data


@pytest.mark.parametrize(
    "value",
    [
        1.0,
        {"a": 0.5},
        [float("nan")],
        INT_MAX + 1,
        INT_MIN - 1,
        {1: "int key"},
        {"\ud800": 1},
        "\udc00",
        {1, 2},
        object(),
    ],
    ids=repr,
)
def test_encode_refuses_non_data_model_values(value: object) -> None:
    with pytest.raises(CborError):
        encode(value)


def test_encode_depth_bound_and_tuples() -> None:
    assert encode((1, 2)) == encode([1, 2])
    nested: list[object] = []
    for _ in range(MAX_DEPTH):
        nested = [nested]
    with pytest.raises(CborError) as info:
        encode(nested)
    assert info.value.reason == "too_deep"


def test_json_form_of_links_and_bytes() -> None:
    value = {"l": LINK, "b": b"\x00\xff\x10", "n": [None, True, -5, "s"]}
    json_form = to_json(value)
    assert json_form == {
        "l": {"$link": str(LINK)},
        "b": {"$bytes": "AP8Q"},
        "n": [None, True, -5, "s"],
    }
    assert from_json(json_form) == value


@pytest.mark.parametrize(
    "obj",
    [
        {"b": {"$bytes": "AP8Q="}},  # padding
        {"b": {"$bytes": "AP9"}},  # non-zero trailing bits: not canonical
        {"b": {"$bytes": "AP-_"}},  # URL-safe alphabet
        {"b": {"$bytes": "A"}},  # impossible length
        {"b": {"$bytes": "AP 8Q"}},
        {"l": {"$link": str(LINK).upper()}},
        {"l": {"$link": "z" + str(LINK)[1:]}},
        {"l": {"$link": "bafy"}},
        {"n": float("inf")},
        {"n": float("nan")},
        {"n": 0.1},
        {"n": 2**63},
        {"n": 1e300},
        {1: "x"},
        {"s": {"x"}},
        {"blb": {"$type": "blob", "ref": "x", "mimeType": "a/b", "size": 1}},
        {"blb": {"$type": "blob", "ref": {"$link": str(LINK)}, "mimeType": "", "size": 1}},
        {"blb": {"$type": "blob", "ref": {"$link": str(LINK)}, "mimeType": "a/b", "size": -1}},
        {"blb": {"$type": "blob", "ref": {"$link": str(LINK)}, "mimeType": "a/b", "size": True}},
        {"blb": {"$type": "blob", "ref": {"$link": str(LINK)}, "mimeType": "a/b", "size": 1, "x": 1}},
        [1],
        None,
    ],
    ids=repr,
)
def test_from_json_rejects(obj: object) -> None:
    with pytest.raises(CborError):
        from_json(obj)


def test_from_json_integral_float_becomes_int() -> None:
    value = from_json({"a": 123.0, "b": [-0.0]})
    assert value == {"a": 123, "b": [0]}
    assert type(value["a"]) is int
    assert encode(value) == encode({"a": 123, "b": [0]})


def test_from_json_depth_bound() -> None:
    obj: object = 1
    for _ in range(MAX_DEPTH):
        obj = [obj]
    with pytest.raises(CborError) as info:
        from_json({"a": obj})
    assert info.value.reason == "too_deep"


def test_to_json_refuses_non_data_model_values() -> None:
    for value in (1.5, {2: 1}, object(), 2**64):
        with pytest.raises(CborError):
            to_json(value)


@pytest.mark.parametrize("key", ["$link", "$bytes"])
def test_to_json_refuses_maps_with_a_key_the_json_form_reserves(key: str) -> None:
    """Found by fuzzing: {"$bytes": "AAAA"} is valid DAG-CBOR, but its JSON form read back was bytes."""
    for value in ({key: "AAAA"}, {"a": [{key: str(LINK), "b": 1}]}):
        decoded = decode(encode(value))
        assert decoded == value
        with pytest.raises(CborError, match="no JSON form"):
            to_json(decoded)


def test_check_data_model_on_decoded_values() -> None:
    blob = {"$type": "blob", "ref": LINK, "mimeType": "image/png", "size": 3}
    check_data_model(decode(encode({"a": [blob], "$type": "x.y.z"})))
    with pytest.raises(CborError):
        check_data_model(decode(encode({"a": [{"$type": ""}]})))
    with pytest.raises(CborError):
        check_data_model({"a": [{**blob, "size": "3"}]})
