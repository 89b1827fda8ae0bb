"""Strict, typed DAG-CBOR codec and atproto data-model JSON form: the exact (slow) reference.

The hot path decodes with libipld through ``protocol.cbor``, which is lenient in places (it
accepts floats and non-minimal integers, and returns links as plain ``bytes``). This module
is the exact reference: links decode to ``CID`` objects, byte strings to ``bytes``, and
anything the atproto data model forbids is refused with ``CborError``.

``decode`` always checks: truncation and trailing bytes; minimal integer and length heads;
no indefinite lengths; no floats; no simple values except false/true/null; only tag 42,
wrapping a byte string of 0x00 and a valid CID (v1, dag-cbor or raw, sha-256); text-only
map keys in canonical order (shorter first, then bytewise) without duplicates; valid UTF-8;
integers in signed 64-bit range; nesting depth (``too_deep``); input size (``too_large``);
declared lengths no larger than the remaining input, checked before allocating.
It does not check data-model semantics (``$type`` and blob shape): ``check_data_model``
does, and ``from_json`` applies it.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

from protocol.cbor import MAX_BLOCK_BYTES
from protocol.cid import check_cid, cid_from_str, cid_to_str
from protocol.errors import CborError, CidError

MAX_DEPTH = 64  # default bound on nested arrays/maps, for decode, encode and JSON conversion
INT_MAX = 2**63 - 1
INT_MIN = -(2**63)

_MAJOR_UINT, _MAJOR_NEGINT, _MAJOR_BYTES, _MAJOR_TEXT = 0, 1, 2, 3
_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG, _MAJOR_SIMPLE = 4, 5, 6, 7
_TAG_CID = 42
# Smallest value that may use each additional-info width; anything smaller is non-minimal.
_MIN_FOR_INFO = {24: 24, 25: 0x100, 26: 0x10000, 27: 0x100000000}
_SIMPLE_VALUES: dict[int, bool | None] = {0xF4: False, 0xF5: True, 0xF6: None}


@dataclass(frozen=True, slots=True)
class CID:
    """A link: a validated binary CIDv1 (dag-cbor or raw, sha-256). ``str()`` is ``bafy...``."""

    binary: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.binary, bytes):
            raise CidError("CID must be built from bytes")
        check_cid(self.binary)

    @classmethod
    def from_str(cls, text: str) -> CID:
        """Parse the base32 string form (``bafy...``); ``CidError`` if malformed."""
        return cls(bytes(cid_from_str(text)))

    def __str__(self) -> str:
        return cid_to_str(self.binary)

    def __bytes__(self) -> bytes:
        return self.binary

    def __repr__(self) -> str:
        return f"CID({cid_to_str(self.binary)!r})"


class _Decoder:
    """Cursor over one input buffer; every read checks the remaining length first."""

    __slots__ = ("data", "end", "max_depth", "pos")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.max_depth = max_depth

    def head(self) -> tuple[int, int]:
        """Read one initial byte plus argument: (major type, minimal argument value)."""
        data, pos = self.data, self.pos
        if pos >= self.end:
            raise CborError("truncated: expected a data item")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if major == _MAJOR_SIMPLE:
            if initial not in _SIMPLE_VALUES:
                kind = "floats are" if 25 <= info <= 27 else f"simple value 0x{initial:02x} is"
                raise CborError(f"{kind} not allowed in DAG-CBOR")
            self.pos = pos
            return major, initial
        if info < 24:
            value = info
        elif info <= 27:
            width = 1 << (info - 24)
            if pos + width > self.end:
                raise CborError("truncated: integer or length argument")
            value = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if value < _MIN_FOR_INFO[info]:
                raise CborError("non-minimal integer or length encoding")
        elif info == 31:
            raise CborError("indefinite lengths are not allowed in DAG-CBOR")
        else:
            raise CborError(f"reserved additional information {info}")
        self.pos = pos
        return major, value

    def take(self, length: int) -> bytes:
        """The next ``length`` bytes; refuses a declared length beyond the remaining input."""
        pos = self.pos
        if length > self.end - pos:
            raise CborError(f"truncated: declared length {length} exceeds the remaining input")
        self.pos = pos + length
        return self.data[pos : pos + length]

    def text(self, length: int) -> str:
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise CborError("invalid UTF-8 in text string") from None

    def item(self, depth: int) -> Any:
        """Decode one data item; ``depth`` is the number of enclosing arrays/maps."""
        major, value = self.head()
        if major <= _MAJOR_NEGINT:  # unsigned or negative integer
            if value > INT_MAX:
                raise CborError("integer outside the signed 64-bit range")
            return value if major == _MAJOR_UINT else -1 - value
        if major == _MAJOR_BYTES:
            return self.take(value)
        if major == _MAJOR_TEXT:
            return self.text(value)
        if major == _MAJOR_SIMPLE:
            return _SIMPLE_VALUES[value]
        if major == _MAJOR_TAG:
            return self.link(value)
        if depth >= self.max_depth:
            raise CborError(f"nesting deeper than {self.max_depth}", reason="too_deep")
        remaining = self.end - self.pos
        if major == _MAJOR_ARRAY:
            if value > remaining:  # every item takes at least one byte
                raise CborError(f"truncated: array of {value} items exceeds the remaining input")
            return [self.item(depth + 1) for _ in range(value)]
        if 2 * value > remaining:  # every entry takes at least two bytes
            raise CborError(f"truncated: map of {value} entries exceeds the remaining input")
        return self.entries(value, depth)

    def entries(self, count: int, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        previous = b""
        for index in range(count):
            major, length = self.head()
            if major != _MAJOR_TEXT:
                raise CborError("map keys must be text strings")
            start = self.pos
            key = self.text(length)
            raw = self.data[start : self.pos]
            if index and (len(raw), raw) <= (len(previous), previous):
                problem = "duplicate" if raw == previous else "non-canonical order of"
                raise CborError(f"{problem} map key {key!r}")
            previous = raw
            out[key] = self.item(depth + 1)
        return out

    def link(self, tag: int) -> CID:
        if tag != _TAG_CID:
            raise CborError(f"tag {tag} is not allowed (only 42, links)")
        major, length = self.head()
        if major != _MAJOR_BYTES:
            raise CborError("tag 42 must wrap a byte string")
        body = self.take(length)
        if not body or body[0] != 0:
            raise CborError("tag 42 byte string must start with the 0x00 multibase prefix")
        try:
            return CID(body[1:])
        except CidError as exc:
            raise CborError(f"invalid CID in link: {exc}") from None


def decode(
    data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BLOCK_BYTES
) -> Any:
    """Decode exactly one strict DAG-CBOR item from ``data``; ``CborError`` otherwise."""
    if len(data) > max_bytes:
        raise CborError(f"object of {len(data)} bytes exceeds {max_bytes}", reason="too_large")
    decoder = _Decoder(bytes(data), max_depth)
    value = decoder.item(0)
    if decoder.pos != decoder.end:
        raise CborError(f"{decoder.end - decoder.pos} trailing bytes after the data item")
    return value


def _head(out: bytearray, major: int, value: int) -> None:
    base = major << 5
    if value < 24:
        out.append(base | value)
    elif value < 0x100:
        out += bytes((base | 24, value))
    elif value < 0x10000:
        out.append(base | 25)
        out += value.to_bytes(2, "big")
    elif value < 0x100000000:
        out.append(base | 26)
        out += value.to_bytes(4, "big")
    else:
        out.append(base | 27)
        out += value.to_bytes(8, "big")


def _encode_into(out: bytearray, value: Any, depth: int, max_depth: int) -> None:
    if value is None or value is True or value is False:
        out.append(0xF6 if value is None else 0xF5 if value else 0xF4)
    elif isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise CborError("integer outside the signed 64-bit range")
        if value >= 0:
            _head(out, _MAJOR_UINT, value)
        else:
            _head(out, _MAJOR_NEGINT, -1 - value)
    elif isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise CborError("string is not valid Unicode (lone surrogate)") from None
        _head(out, _MAJOR_TEXT, len(raw))
        out += raw
    elif isinstance(value, bytes | bytearray):
        _head(out, _MAJOR_BYTES, len(value))
        out += value
    elif isinstance(value, CID):
        _head(out, _MAJOR_TAG, _TAG_CID)
        _head(out, _MAJOR_BYTES, len(value.binary) + 1)
        out.append(0)
        out += value.binary
    elif isinstance(value, float):
        raise CborError("floats are not allowed in the atproto data model")
    elif isinstance(value, list | tuple | dict):
        if depth >= max_depth:
            raise CborError(f"nesting deeper than {max_depth}", reason="too_deep")
        if isinstance(value, dict):
            _encode_map(out, value, depth, max_depth)
        else:
            _head(out, _MAJOR_ARRAY, len(value))
            for item in value:
                _encode_into(out, item, depth + 1, max_depth)
    else:
        raise CborError(f"cannot encode a {type(value).__name__} as DAG-CBOR")


def _encode_map(out: bytearray, value: dict[Any, Any], depth: int, max_depth: int) -> None:
    keyed: list[tuple[int, bytes, Any]] = []
    for key, item in value.items():
        if not isinstance(key, str):
            raise CborError(f"map keys must be strings, not {type(key).__name__}")
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError:
            raise CborError("map key is not valid Unicode (lone surrogate)") from None
        keyed.append((len(raw), raw, item))
    keyed.sort(key=lambda entry: (entry[0], entry[1]))
    _head(out, _MAJOR_MAP, len(keyed))
    for length, raw, item in keyed:
        _head(out, _MAJOR_TEXT, length)
        out += raw
        _encode_into(out, item, depth + 1, max_depth)


def encode(value: Any, *, max_depth: int = MAX_DEPTH) -> bytes:
    """Encode to canonical DAG-CBOR (sorted keys, minimal heads, ``CID`` as tag 42); no floats."""
    out = bytearray()
    _encode_into(out, value, 0, max_depth)
    return bytes(out)


def _check_object(obj: dict[str, Any]) -> None:
    """Data-model rules for one map: ``$type`` is a non-empty string; a blob has its 4 fields."""
    if "$type" not in obj:
        return
    kind = obj["$type"]
    if not isinstance(kind, str) or not kind:
        raise CborError("$type must be a non-empty string")
    if kind != "blob":
        return
    if set(obj) != {"$type", "ref", "mimeType", "size"}:
        raise CborError("a blob has exactly the fields $type, ref, mimeType and size")
    size = obj["size"]
    if not isinstance(obj["ref"], CID):
        raise CborError("blob ref must be a link")
    if not isinstance(obj["mimeType"], str) or not obj["mimeType"]:
        raise CborError("blob mimeType must be a non-empty string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CborError("blob size must be a non-negative integer")


def check_data_model(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Apply the data-model rules of ``_check_object`` to every map inside a decoded value."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= max_depth:
                raise CborError(f"nesting deeper than {max_depth}", reason="too_deep")
            if isinstance(item, dict):
                _check_object(item)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    """Standard-alphabet base64 without padding, canonical (re-encoding gives ``text`` back)."""
    if not text.isascii() or "=" in text:
        raise CborError("$bytes must be standard base64 without padding")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CborError("$bytes is not valid base64") from None
    if _b64encode(raw) != text:
        raise CborError("$bytes is not canonical base64")
    return raw


def to_json(value: Any, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON form of a decoded value: ``{"$link": ...}`` for CIDs, ``{"$bytes": ...}`` for bytes.

    A map with a ``$link`` or ``$bytes`` key of its own has no faithful JSON form (``from_json``
    would read it back as a link or bytes, or refuse it): ``CborError``.
    """
    return _to_json(value, 0, max_depth)


def _to_json(value: Any, depth: int, max_depth: int) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise CborError("integer outside the signed 64-bit range")
        return value
    if isinstance(value, bytes):
        return {"$bytes": _b64encode(value)}
    if isinstance(value, CID):
        return {"$link": str(value)}
    if isinstance(value, list | tuple | dict):
        if depth >= max_depth:
            raise CborError(f"nesting deeper than {max_depth}", reason="too_deep")
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise CborError("map keys must be strings")
            if "$link" in value or "$bytes" in value:
                raise CborError("a map with a $link or $bytes key has no JSON form")
            return {key: _to_json(item, depth + 1, max_depth) for key, item in value.items()}
        return [_to_json(item, depth + 1, max_depth) for item in value]
    raise CborError(f"{type(value).__name__} is not an atproto data-model value")


def from_json(obj: Any, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Parse a JSON-decoded atproto data object (top level must be an object) into typed values.

    Integral floats (``123.0``, as JSON parsers may produce) become ints; other floats, bad
    ``$link``/``$bytes`` objects, bad ``$type`` values and malformed blobs raise ``CborError``.
    """
    if not isinstance(obj, dict):
        raise CborError("the top level of a data-model object must be a JSON object")
    result: dict[str, Any] = _from_json(obj, 0, max_depth)
    return result


def _from_json(obj: Any, depth: int, max_depth: int) -> Any:
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        if not INT_MIN <= obj <= INT_MAX:
            raise CborError("integer outside the signed 64-bit range")
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj) or not obj.is_integer():
            raise CborError("floats are not allowed in the atproto data model")
        return _from_json(int(obj), depth, max_depth)
    if not isinstance(obj, list | dict):
        raise CborError(f"{type(obj).__name__} is not a JSON data-model value")
    if depth >= max_depth:
        raise CborError(f"nesting deeper than {max_depth}", reason="too_deep")
    if isinstance(obj, list):
        return [_from_json(item, depth + 1, max_depth) for item in obj]
    if not all(isinstance(key, str) for key in obj):
        raise CborError("object keys must be strings")
    if "$link" in obj:
        if len(obj) != 1 or not isinstance(obj["$link"], str):
            raise CborError("a $link object has exactly one string field")
        try:
            return CID.from_str(obj["$link"])
        except CidError as exc:
            raise CborError(f"bad $link: {exc}") from None
    if "$bytes" in obj:
        if len(obj) != 1 or not isinstance(obj["$bytes"], str):
            raise CborError("a $bytes object has exactly one string field")
        return _b64decode(obj["$bytes"])
    out = {key: _from_json(item, depth + 1, max_depth) for key, item in obj.items()}
    _check_object(out)
    return out
