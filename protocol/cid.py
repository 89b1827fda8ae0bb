"""Content identifiers: CIDv1 with sha-256 over dag-cbor or raw blocks, kept as binary bytes.

On the hot path a CID is its binary form (``bytes``, 36 bytes for the CIDs atproto uses),
exactly what libipld returns for a decoded tag-42 link. This module converts to and from the
base32 string form and computes CIDs of blocks.
"""

from __future__ import annotations

import base64
import hashlib
from typing import NewType

from protocol.errors import CidError

CidBytes = NewType("CidBytes", bytes)

CID_VERSION_1 = 0x01
CODEC_DAG_CBOR = 0x71
CODEC_RAW = 0x55
HASH_SHA256 = 0x12
SHA256_LEN = 32

_PREFIX_DAG_CBOR = bytes((CID_VERSION_1, CODEC_DAG_CBOR, HASH_SHA256, SHA256_LEN))
_PREFIX_RAW = bytes((CID_VERSION_1, CODEC_RAW, HASH_SHA256, SHA256_LEN))
SUPPORTED_PREFIXES = frozenset((_PREFIX_DAG_CBOR, _PREFIX_RAW))


def cid_for_dag_cbor(block: bytes) -> CidBytes:
    """The CIDv1 (dag-cbor, sha-256) of an encoded block."""
    return CidBytes(_PREFIX_DAG_CBOR + hashlib.sha256(block).digest())


def cid_for_raw(block: bytes) -> CidBytes:
    """The CIDv1 (raw, sha-256) of a blob's bytes."""
    return CidBytes(_PREFIX_RAW + hashlib.sha256(block).digest())


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode an unsigned LEB128 varint at ``pos``; return (value, next position).

    Rejects varints longer than 9 bytes and non-minimal encodings (a trailing zero byte).
    """
    value = 0
    shift = 0
    end = len(data)
    start = pos
    while True:
        if pos >= end:
            raise CidError("truncated varint", reason="bad_varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and pos - start > 1:
                raise CidError("non-minimal varint", reason="bad_varint")
            return value, pos
        shift += 7
        if shift >= 63:
            raise CidError("varint too long", reason="bad_varint")


def encode_varint(value: int) -> bytes:
    """Encode an unsigned integer as a LEB128 varint."""
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def check_cid(cid: bytes) -> CidBytes:
    """Validate binary CID bytes (v1, dag-cbor or raw, sha-256 of 32 bytes) and return them."""
    if len(cid) != 36 or cid[:4] not in SUPPORTED_PREFIXES:
        parse_cid(cid)  # raises with a precise message, or accepts another valid form
    return CidBytes(cid)


def parse_cid(cid: bytes) -> tuple[int, int, int, bytes]:
    """Split a binary CIDv1 into (version, codec, hash code, digest); strict about lengths."""
    if not cid:
        raise CidError("empty CID")
    if cid[0] == 0x12 and len(cid) == 34 and cid[1] == 0x20:
        raise CidError("CIDv0 is not allowed in atproto")
    version, pos = read_varint(cid, 0)
    if version != CID_VERSION_1:
        raise CidError(f"unsupported CID version {version}")
    codec, pos = read_varint(cid, pos)
    code, pos = read_varint(cid, pos)
    size, pos = read_varint(cid, pos)
    digest = bytes(cid[pos:])
    if len(digest) != size:
        raise CidError("CID digest length does not match its declared size")
    if codec not in (CODEC_DAG_CBOR, CODEC_RAW):
        raise CidError(f"unsupported CID codec 0x{codec:x}")
    if code != HASH_SHA256 or size != SHA256_LEN:
        raise CidError(f"unsupported CID hash 0x{code:x}/{size}")
    return version, codec, code, digest


def cid_to_str(cid: bytes) -> str:
    """The multibase base32 (lower case, no padding) string of a binary CID: ``bafy...``."""
    return "b" + base64.b32encode(cid).decode("ascii").rstrip("=").lower()


def cid_from_str(text: str) -> CidBytes:
    """Parse the base32 string form of a CIDv1 into binary bytes (validated)."""
    if not isinstance(text, str) or len(text) < 2 or len(text) > 128:
        raise CidError("CID string has a bad length")
    if text[0] != "b" or not text[1:].isascii() or not text[1:].isalnum() or text[1:] != text[1:].lower():
        raise CidError("only base32 lower-case CIDv1 strings are supported")
    body = text[1:].upper()
    body += "=" * (-len(body) % 8)
    try:
        raw = base64.b32decode(body)
    except (ValueError, TypeError) as exc:
        raise CidError(f"bad base32 in CID: {exc}") from None
    return check_cid(raw)


def verify_block(cid: bytes, block: bytes) -> bool:
    """True when ``block`` hashes to ``cid`` (sha-256; codec as declared by the CID)."""
    return len(cid) == 36 and cid[:4] in SUPPORTED_PREFIXES and hashlib.sha256(block).digest() == cid[4:]
