"""The spider's byte scan: DIDs found in raw DAG-CBOR bytes (frames, CARs, blocks) without decoding them.

A DID counts only as a whole CBOR text string: its header byte(s) must declare exactly its
length. A text string of length n < 24 has the one-byte header ``0x60 + n``; 24 <= n <= 255
has ``0x78 n``. A ``did:plc`` is always 32 bytes, so its header is ``0x78 0x20`` and one
compiled pattern with the literal prefix ``did:`` (the regex engine's fast prefix search)
matches it whole, header included (a look-behind). A ``did:web`` has any length from 9 up:
the pattern only finds its ``did:web:`` start and the rare slow path reads the header before
it, takes that many bytes and checks them. Longer text (``0x79``, over 255 bytes) is skipped.

Known limit: the scan does not parse, so a DID written in a longer text right after a
character that happens to equal its header (``"fox did:plc:..."``: ``x`` is 0x78 and a space
0x20) is taken too. It is still a DID; the cost is one look-up at most.
"""

from __future__ import annotations

import re

SCAN = re.compile(rb"did:(?:(?<=\x78\x20did:)plc:[a-z2-7]{24}|web:)")
_WEB_START = b"did:web:"
_WEB_DID = re.compile(rb"did:web:[a-zA-Z0-9._%:-]+")
_TEXT_1 = 0x60  # text string, length in the header's low bits (< 24)
_TEXT_2 = 0x78  # text string, length in the next byte (24..255)


def scan_dids(data: bytes) -> set[bytes]:
    """Every ``did:plc``/``did:web`` that is a whole CBOR text string somewhere in ``data``."""
    found = set(SCAN.findall(data))
    if _WEB_START in found:
        found.discard(_WEB_START)
        found.update(_web_dids(data))
    return found


def _web_dids(data: bytes) -> list[bytes]:
    out = []
    at = data.find(_WEB_START)
    while at >= 0:
        did = _web_at(data, at)
        if did is not None:
            out.append(did)
        at = data.find(_WEB_START, at + len(_WEB_START))
    return out


def _web_at(data: bytes, at: int) -> bytes | None:
    """The did:web whose text string starts at ``at``, if the header before it says where it ends."""
    lengths = []
    if at >= 2 and data[at - 2] == _TEXT_2 and data[at - 1] >= 24:
        lengths.append(data[at - 1])  # the two-byte header wins: read as one byte, it is a shorter prefix
    if at >= 1 and _TEXT_1 + len(_WEB_START) < data[at - 1] < _TEXT_2:
        lengths.append(data[at - 1] - _TEXT_1)
    for length in lengths:
        candidate = data[at : at + length]
        if len(candidate) == length and _WEB_DID.fullmatch(candidate):
            return candidate
    return None
