"""CAR v1 files: split into verified (CID, block) pairs, and write them back.

``read_car`` always checks: the header is a DAG-CBOR map with ``version`` 1 and a ``roots``
list of valid CIDs; every section has a minimal varint length, is non-empty and fits in the
remaining input; every CID is v1 dag-cbor/raw sha-256; every block is at most
``max_block_bytes``; the number of blocks is at most ``max_blocks``; every block's sha-256
equals its CID's digest (``BlockHashMismatch``). All bounds are checked before slicing, so
hostile input fails in time and memory linear in its length.
It does not check that the roots are among the blocks (callers that need a root look it up
and raise ``MissingBlock``), nor that dag-cbor blocks decode. A repeated CID is accepted
(its bytes verified again); the dict keeps the first position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from protocol import cbor
from protocol.cid import SUPPORTED_PREFIXES, check_cid, encode_varint, read_varint
from protocol.dagcbor import CID
from protocol.dagcbor import encode as encode_strict
from protocol.errors import BlockHashMismatch, CarError, CborError, CidError

MAX_BLOCK_BYTES = cbor.MAX_BLOCK_BYTES  # largest block data accepted (the atproto record limit)
MAX_BLOCKS = 10_000  # default bound on blocks per CAR; full-repo readers pass a larger one
MAX_HEADER_BYTES = 64 * 1024  # a header holds a version and a few roots

_CID_LEN = 36  # v1 + codec + sha2-256 + 32-byte length, then the digest
_DIGEST_START = 4


@dataclass(frozen=True, slots=True)
class CarFile:
    """A parsed CAR: binary root CIDs and blocks keyed by binary CID, in file order."""

    roots: tuple[bytes, ...]
    blocks: dict[bytes, bytes]


def _read_header(data: bytes) -> tuple[tuple[bytes, ...], int]:
    """Parse the header; return (roots, position of the first section)."""
    length, pos = read_varint(data, 0)
    if length == 0:
        raise CarError("empty CAR header")
    if length > MAX_HEADER_BYTES or length > len(data) - pos:
        raise CarError(f"CAR header length {length} exceeds the input or the limit")
    end = pos + length
    try:
        header = cbor.decode(data[pos:end])
    except CborError as exc:
        raise CarError(f"bad CAR header: {exc}") from None
    if not isinstance(header, dict):
        raise CarError("CAR header is not a map")
    version = header.get("version")
    if type(version) is not int or version != 1:
        raise CarError(f"unsupported CAR version {version!r}")
    roots = header.get("roots")
    if not isinstance(roots, list) or not all(isinstance(root, bytes) for root in roots):
        raise CarError("CAR header roots must be a list of links")
    for root in roots:
        check_cid(root)
    return tuple(roots), end


def cid_length(data: bytes, pos: int) -> int:
    """Length of the CID starting at ``pos`` (general form: four varints then the digest)."""
    start = pos
    for _ in range(3):  # version, codec, hash function
        _, pos = read_varint(data, pos)
    size, pos = read_varint(data, pos)
    return pos - start + size


def _sections(data: bytes, pos: int, max_blocks: int, max_block_bytes: int) -> Iterator[tuple[bytes, bytes]]:
    """Yield verified (CID, block) pairs from ``pos`` to the end of ``data``."""
    end = len(data)
    sha256 = hashlib.sha256
    prefixes = SUPPORTED_PREFIXES
    count = 0
    while pos < end:
        byte = data[pos]
        if byte < 0x80:  # one-byte varint: sections under 128 bytes
            length = byte
            pos += 1
        elif pos + 1 < end and data[pos + 1] < 0x80 and data[pos + 1]:  # two bytes, minimal
            length = (byte & 0x7F) | (data[pos + 1] << 7)
            pos += 2
        else:
            length, pos = read_varint(data, pos)
        if length == 0:
            raise CarError("zero-length CAR section")
        if length > end - pos:
            raise CarError(f"CAR section of {length} bytes exceeds the remaining input")
        count += 1
        if count > max_blocks:
            raise CarError(f"CAR has more than {max_blocks} blocks", reason="too_large")
        stop = pos + length
        if data[pos : pos + _DIGEST_START] in prefixes and length >= _CID_LEN:
            cid_end = pos + _CID_LEN
        else:
            cid_len = cid_length(data, pos)
            if cid_len > length:
                raise CarError("CID runs past the end of its CAR section")
            cid_end = pos + cid_len
            check_cid(data[pos:cid_end])
        if stop - cid_end > max_block_bytes:
            raise CarError(f"CAR block of {stop - cid_end} bytes exceeds {max_block_bytes}", reason="too_large")
        cid = data[pos:cid_end]
        block = data[cid_end:stop]
        if sha256(block).digest() != cid[_DIGEST_START:]:
            raise BlockHashMismatch(f"block does not hash to its CID at offset {pos}")
        yield cid, block
        pos = stop


def read_car(
    data: bytes | bytearray | memoryview, *, max_blocks: int = MAX_BLOCKS, max_block_bytes: int = MAX_BLOCK_BYTES
) -> CarFile:
    """Parse and verify a whole CAR v1; ``CarError`` (or ``BlockHashMismatch``) if it is bad."""
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        roots, pos = _read_header(data)
        blocks = dict(_sections(data, pos, max_blocks, max_block_bytes))
    except CidError as exc:
        raise CarError(str(exc)) from None
    return CarFile(roots, blocks)


def iter_car_blocks(
    data: bytes | bytearray | memoryview, *, max_blocks: int = MAX_BLOCKS, max_block_bytes: int = MAX_BLOCK_BYTES
) -> Iterator[tuple[bytes, bytes]]:
    """Yield verified (CID, block) pairs in file order, checking the header first.

    Same checks as ``read_car``; an error is raised when the bad section is reached, after
    the good pairs before it have been yielded.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        _, pos = _read_header(data)
        yield from _sections(data, pos, max_blocks, max_block_bytes)
    except CidError as exc:
        raise CarError(str(exc)) from None


def write_car(roots: Sequence[bytes], blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Serialize a CAR v1: canonical header with ``roots`` as links, then one section per block.

    CIDs are validated; block hashes are not recomputed (the caller vouches for its blocks).
    """
    try:
        header = encode_strict({"version": 1, "roots": [CID(bytes(root)) for root in roots]})
    except CidError as exc:
        raise CarError(f"bad root: {exc}") from None
    parts = [encode_varint(len(header)), header]
    for cid, block in blocks:
        try:
            check_cid(cid)
        except CidError as exc:
            raise CarError(f"bad block CID: {exc}") from None
        parts.append(encode_varint(len(cid) + len(block)))
        parts.append(cid)
        parts.append(block)
    return b"".join(parts)
