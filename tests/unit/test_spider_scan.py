"""The spider's byte scan: whole CBOR text strings only, header lengths on both sides of 23/24, garbage."""

from __future__ import annotations

import random

import libipld
import pytest

from actors.spider_scan import scan_dids

PLC = "did:plc:" + "abcdefghijklmnopqrstuvwx"  # 32 bytes: header 0x78 0x20
PLC2 = "did:plc:" + "234567abcdefghijklmnopqr"


def cbor(value: object) -> bytes:
    return bytes(libipld.encode_dag_cbor(value))


def test_dids_anywhere_in_a_record_without_a_lexicon() -> None:
    record = {"$type": "x.y", "subject": PLC, "nested": [{"deep": {"v": PLC2}}, "did:web:example.com"], "n": 3}
    assert scan_dids(cbor(record)) == {PLC.encode(), PLC2.encode(), b"did:web:example.com"}


@pytest.mark.parametrize(
    "text",
    [
        "not " + PLC,  # a DID at the end of a longer string
        PLC + " and more",  # at its start
        "at://" + PLC + "/app.bsky.feed.post/3k2",  # an at:// URI
        "did:plc:" + "a" * 23,  # too short
        "did:plc:" + "a" * 25,  # too long
        "did:plc:" + "A" * 24,  # not base32 lower case
        "did:plc:" + "0" * 24,  # 0 and 1 are not base32
        "see did:web:example.com",
        "did:web:example.com/path",  # did:web with a '/': not a DID
        "did:web:",  # empty host
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",
    ],
)
def test_a_did_inside_a_longer_string_or_a_non_did_is_not_taken(text: str) -> None:
    assert scan_dids(cbor({"text": text, "list": [text, 7]})) == set()


@pytest.mark.parametrize("host_length", [1, 14, 15, 16, 17, 100, 247])
def test_did_web_lengths_across_the_one_byte_header_boundary(host_length: int) -> None:
    did = "did:web:" + "h" * host_length  # 8 + host: 15 and 16 put the string at 23 and 24 bytes
    encoded = cbor({"a": did})
    header = encoded[encoded.index(did.encode()) - 2 : encoded.index(did.encode())]
    assert header[1] == 0x60 + len(did) if len(did) < 24 else header == bytes([0x78, len(did)])
    assert scan_dids(encoded) == {did.encode()}
    longer = (did + "x").encode()  # its own DID (over 255 bytes: skipped), never `did`
    assert scan_dids(cbor({"a": did + "x"})) == ({longer} if len(longer) <= 255 else set())
    assert scan_dids(cbor({"a": did[:-1] + ":"})) == {(did[:-1] + ":").encode()}


def test_did_web_with_a_port_and_a_path() -> None:
    dids = ["did:web:localhost%3A8080", "did:web:pds.example.com%3A2583", "did:web:example.com:user:alice"]
    assert scan_dids(cbor(dids)) == {d.encode() for d in dids}


def test_a_did_web_over_255_bytes_is_skipped() -> None:
    assert scan_dids(cbor(["did:web:" + "h" * 248])) == set()  # 256 bytes: a 0x79 header


def test_the_two_byte_header_wins_over_a_one_byte_reading_of_its_length() -> None:
    did = "did:web:" + "w" * 98  # 106 bytes: header 0x78 0x6a, and 0x6a alone would say 10 bytes
    assert scan_dids(cbor([did])) == {did.encode()}


def test_dids_in_a_commit_frame_and_its_car() -> None:
    inner = cbor({"$type": "app.bsky.graph.follow", "subject": PLC2})
    frame = cbor({"op": 1, "t": "#commit"}) + cbor({"repo": PLC, "blocks": inner, "seq": 0})
    assert scan_dids(frame) == {PLC.encode(), PLC2.encode()}


def test_garbage_bytes_are_harmless() -> None:
    rng = random.Random(7)
    for _ in range(200):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        for data in (junk, junk + b"did:web:", b"did:web:" + junk, b"\x78\x20did:plc:" + junk, junk + b"\x78"):
            for did in scan_dids(data):
                assert did.startswith((b"did:plc:", b"did:web:"))
    assert scan_dids(b"") == set()
    assert scan_dids(b"did:web:") == set()
    assert scan_dids(b"\x69did:web:") == set()  # the header says 9 bytes; only 8 are there
    assert scan_dids(b"\x78\x20" + PLC.encode()[:-1]) == set()  # cut short
    assert scan_dids(b"\x78\x20" + PLC.encode()) == {PLC.encode()}  # bare, at the very end
