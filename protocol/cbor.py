"""Fast DAG-CBOR through libipld, with errors mapped to ``CborError`` and size/depth bounds.

libipld rejects non-canonical key order, duplicate keys, indefinite lengths, tags other than
42 and trailing data; it bounds recursion itself. Two quirks callers must know
(see HACKING.md): a decoded CID link comes back as plain ``bytes`` (indistinguishable from a
byte string), and encoding writes any ``bytes`` value that parses as a CID as a link. So never
re-encode a decoded block for storage: keep the raw bytes. Typed parsers in this package
(commit, MST node, frame) check every field's type, which also rejects floats and other
values the atproto data model forbids where structure matters. For a fully typed strict
decode (links as ``CID`` objects, minimal integers, no floats) use ``protocol.dagcbor``.
"""

from __future__ import annotations

from typing import Any

import libipld

from protocol.errors import CborError

MAX_BLOCK_BYTES = 2 * 1024 * 1024  # the atproto limit on one block/record


def decode(data: bytes, max_bytes: int = MAX_BLOCK_BYTES) -> Any:
    """Decode one DAG-CBOR object; ``CborError`` for anything malformed or too large."""
    if len(data) > max_bytes:
        raise CborError(f"object of {len(data)} bytes exceeds {max_bytes}", reason="too_large")
    try:
        return libipld.decode_dag_cbor(data)
    except (ValueError, RecursionError, TypeError, OverflowError) as exc:
        raise CborError(str(exc)) from None


def decode_multi(data: bytes) -> list[Any]:
    """Decode a concatenation of DAG-CBOR objects (a firehose frame is header + body)."""
    try:
        return libipld.decode_dag_cbor_multi(data)
    except (ValueError, RecursionError, TypeError, OverflowError) as exc:
        raise CborError(str(exc)) from None


def encode(obj: Any) -> bytes:
    """Encode to canonical DAG-CBOR. ``bytes`` that parse as a CID are written as links."""
    try:
        return libipld.encode_dag_cbor(obj)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CborError(f"cannot encode: {exc}") from None
