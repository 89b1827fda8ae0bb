"""Syntax of atproto identifiers and strings: DID, handle, NSID, record key, TID, AT-URI, CID, datetime.

Each kind has ``is_valid_<kind>(s) -> bool`` (False for anything that is not a ``str``) and
``ensure_<kind>(s) -> str`` which returns its argument, typed where a ``NewType`` exists, or
raises ``SyntaxInvalid`` with reason ``bad_<kind>``. The rules are those of the atproto
specifications as pinned by the interop vectors (bluesky-social/atproto-interop-tests).

What is checked is syntax only: a valid handle may not resolve, a valid DID method may not
exist, a valid CID string is not decoded (``protocol.cid`` does that), a language tag is not
looked up in the IANA registry.
"""

from __future__ import annotations

import re
from typing import NewType

from protocol.errors import SyntaxInvalid

Did = NewType("Did", str)
Handle = NewType("Handle", str)
Nsid = NewType("Nsid", str)
Tid = NewType("Tid", str)
RecordKey = NewType("RecordKey", str)

MAX_DID_LEN = 2048
MAX_HANDLE_LEN = 253
MAX_NSID_LEN = 317
MAX_RECORD_KEY_LEN = 512
MAX_URI_LEN = 8192  # AT-URI and generic URI: 8 KiB
MAX_CID_LEN = 256
MAX_DATETIME_LEN = 64
MAX_LANGUAGE_LEN = 128

TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"  # base32-sortable: byte order = numeric order
TID_LEN = 13

_DID_RE = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
# A domain name: labels of 1-63 alphanumerics and inner hyphens; the TLD starts with a letter.
_HANDLE_RE = re.compile(rf"(?:{_LABEL}\.)+[a-zA-Z](?:[a-zA-Z0-9-]{{0,61}}[a-zA-Z0-9])?")
# Reversed domain authority (first segment starts with a letter) then a name of letters/digits.
_NSID_RE = re.compile(rf"[a-zA-Z](?:[a-zA-Z0-9-]{{0,61}}[a-zA-Z0-9])?(?:\.{_LABEL})+\.[a-zA-Z][a-zA-Z0-9]{{0,62}}")
_RECORD_KEY_RE = re.compile(r"[a-zA-Z0-9._:~-]{1,512}")
# 13 characters carry 65 bits: a first character below 'k' keeps the value within 64 bits.
_TID_RE = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")
_CID_RE = re.compile(r"[a-zA-Z0-9+=]{8,256}")
_DATETIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{1,20})?"
    r"(?:Z|([+-])([0-9]{2}):([0-9]{2}))"
)
_URI_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:[!-~]+")  # RFC 3986 scheme, then visible ASCII
_LANGUAGE_RE = re.compile(r"(?:[a-z]{2,3}|i|[xX])(?:-[a-zA-Z0-9]{1,8})*")

_TID_VALUES = {c: i for i, c in enumerate(TID_ALPHABET)}
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def is_valid_did(s: str) -> bool:
    """``did:<method>:<id>``: lower-case method; id of ``[A-Za-z0-9._:%-]``, not ending in ``:``/``%``."""
    return isinstance(s, str) and len(s) <= MAX_DID_LEN and _DID_RE.fullmatch(s) is not None


def is_valid_handle(s: str) -> bool:
    """A domain name of 2+ labels, at most 253 characters, whose TLD does not start with a digit."""
    return isinstance(s, str) and len(s) <= MAX_HANDLE_LEN and _HANDLE_RE.fullmatch(s) is not None


def is_valid_at_identifier(s: str) -> bool:
    """A DID or a handle (what an AT-URI authority or an XRPC ``repo`` parameter may be)."""
    return is_valid_did(s) or is_valid_handle(s)


def is_valid_nsid(s: str) -> bool:
    """A reversed domain of 2+ segments plus a name segment (letters and digits, first a letter)."""
    return isinstance(s, str) and len(s) <= MAX_NSID_LEN and _NSID_RE.fullmatch(s) is not None


def is_valid_record_key(s: str) -> bool:
    """1-512 characters of ``[A-Za-z0-9._:~-]``, but not ``.`` or ``..``."""
    return isinstance(s, str) and _RECORD_KEY_RE.fullmatch(s) is not None and s not in (".", "..")


def is_valid_tid(s: str) -> bool:
    """13 characters of the base32-sortable alphabet, the first one below ``k`` (fits 64 bits)."""
    return isinstance(s, str) and _TID_RE.fullmatch(s) is not None


def is_valid_at_uri(s: str) -> bool:
    """The restricted AT-URI: ``at://<did or handle>[/<nsid>[/<record key>]]``.

    No query, no fragment, no trailing slash, at most 8 KiB.
    """
    if not isinstance(s, str) or len(s) > MAX_URI_LEN or not s.startswith("at://"):
        return False
    parts = s[5:].split("/")
    if len(parts) > 3 or not is_valid_at_identifier(parts[0]):
        return False
    if len(parts) > 1 and not is_valid_nsid(parts[1]):
        return False
    return len(parts) < 3 or is_valid_record_key(parts[2])


def is_valid_cid(s: str) -> bool:
    """The loose CID string syntax: 8-256 of ``[A-Za-z0-9+=]`` (any multibase), not CIDv0 ``Qm...``."""
    return isinstance(s, str) and _CID_RE.fullmatch(s) is not None and not s.startswith("Qm")


def is_valid_uri(s: str) -> bool:
    """A generic URI: an RFC 3986 scheme, ``:``, then 1+ visible ASCII characters; at most 8 KiB."""
    return isinstance(s, str) and len(s) <= MAX_URI_LEN and _URI_RE.fullmatch(s) is not None


def is_valid_datetime(s: str) -> bool:
    """An RFC 3339 date-time that is also ISO 8601, with a real calendar date and time.

    Upper-case ``T`` and ``Z``; seconds required; fraction optional (1-20 digits); timezone
    required, as ``Z`` or ``+hh:mm``/``-hh:mm`` but never ``-00:00``; no leap second (``:60``);
    the instant, normalised to UTC, must not fall before year 0000.
    """
    if not isinstance(s, str) or len(s) > MAX_DATETIME_LEN:
        return False
    m = _DATETIME_RE.fullmatch(s)
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if not (1 <= month <= 12 and 1 <= day <= _days_in_month(year, month)):
        return False
    if hour > 23 or minute > 59 or second > 59:
        return False
    sign, off_h, off_m = m.group(7, 8, 9)
    if sign is None:
        return True
    if int(off_h) > 23 or int(off_m) > 59 or (sign == "-" and off_h == "00" and off_m == "00"):
        return False
    offset_min = (int(off_h) * 60 + int(off_m)) * (1 if sign == "+" else -1)
    # Only 0000-01-01 with a positive offset can reach back before year 0 once normalised.
    return not (year == 0 and month == 1 and day == 1 and hour * 60 + minute < offset_min)


def _days_in_month(year: int, month: int) -> int:
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29  # proleptic Gregorian: year 0000 is a leap year
    return _DAYS_IN_MONTH[month - 1]


def is_valid_language(s: str) -> bool:
    """A BCP 47 language tag, checked structurally (not against the IANA registry).

    A lower-case 2-3 letter primary language (or ``i-`` grandfathered, or ``x-`` private use),
    then ``-`` subtags of 1-8 alphanumerics. RFC 5646 validity rules enforced: no variant subtag
    repeated, no extension singleton repeated (both case-insensitive), every singleton followed
    by at least one subtag.
    """
    if not isinstance(s, str) or len(s) > MAX_LANGUAGE_LEN or _LANGUAGE_RE.fullmatch(s) is None:
        return False
    primary, *subtags = s.split("-")
    if primary in ("i", "x", "X"):
        return bool(subtags)
    variants: set[str] = set()
    singletons: set[str] = set()
    in_extension = False  # after the first singleton, subtags belong to extensions
    needs_subtag = False  # a singleton not yet followed by a subtag
    for i, subtag in enumerate(subtags):
        low = subtag.lower()
        if len(low) == 1:
            if needs_subtag:
                return False
            if low == "x":
                return i + 1 < len(subtags)  # private use: the rest is free-form
            if low in singletons:
                return False
            singletons.add(low)
            in_extension = needs_subtag = True
        elif in_extension:
            needs_subtag = False
        elif len(low) >= 5 or (len(low) == 4 and low[0].isdigit()):  # a variant subtag
            if low in variants:
                return False
            variants.add(low)
    return not needs_subtag


def _ensure(valid: bool, s: object, kind: str) -> None:
    if not valid:
        shown = repr(s) if not isinstance(s, str) or len(s) <= 80 else repr(s[:80]) + "..."
        raise SyntaxInvalid(f"invalid {kind.replace('_', ' ')}: {shown}", reason=f"bad_{kind}")


def ensure_did(s: str) -> Did:
    """``s`` as a ``Did``, or ``SyntaxInvalid(reason="bad_did")``."""
    _ensure(is_valid_did(s), s, "did")
    return Did(s)


def ensure_handle(s: str) -> Handle:
    """``s`` as a ``Handle`` (case kept as given), or ``SyntaxInvalid(reason="bad_handle")``."""
    _ensure(is_valid_handle(s), s, "handle")
    return Handle(s)


def ensure_at_identifier(s: str) -> str:
    """``s`` if it is a DID or a handle, or ``SyntaxInvalid(reason="bad_at_identifier")``."""
    _ensure(is_valid_at_identifier(s), s, "at_identifier")
    return s


def ensure_nsid(s: str) -> Nsid:
    """``s`` as an ``Nsid``, or ``SyntaxInvalid(reason="bad_nsid")``."""
    _ensure(is_valid_nsid(s), s, "nsid")
    return Nsid(s)


def ensure_record_key(s: str) -> RecordKey:
    """``s`` as a ``RecordKey``, or ``SyntaxInvalid(reason="bad_record_key")``."""
    _ensure(is_valid_record_key(s), s, "record_key")
    return RecordKey(s)


def ensure_tid(s: str) -> Tid:
    """``s`` as a ``Tid``, or ``SyntaxInvalid(reason="bad_tid")``."""
    _ensure(is_valid_tid(s), s, "tid")
    return Tid(s)


def ensure_at_uri(s: str) -> str:
    """``s`` if it is a restricted AT-URI, or ``SyntaxInvalid(reason="bad_at_uri")``."""
    _ensure(is_valid_at_uri(s), s, "at_uri")
    return s


def ensure_cid(s: str) -> str:
    """``s`` if it has CID string syntax, or ``SyntaxInvalid(reason="bad_cid")``."""
    _ensure(is_valid_cid(s), s, "cid")
    return s


def ensure_uri(s: str) -> str:
    """``s`` if it is a generic URI, or ``SyntaxInvalid(reason="bad_uri")``."""
    _ensure(is_valid_uri(s), s, "uri")
    return s


def ensure_datetime(s: str) -> str:
    """``s`` if it is a valid atproto datetime, or ``SyntaxInvalid(reason="bad_datetime")``."""
    _ensure(is_valid_datetime(s), s, "datetime")
    return s


def ensure_language(s: str) -> str:
    """``s`` if it is a BCP 47 language tag, or ``SyntaxInvalid(reason="bad_language")``."""
    _ensure(is_valid_language(s), s, "language")
    return s


def tid_to_int(tid: str) -> int:
    """The 64-bit integer a TID encodes (53 bits of microseconds, then a 10-bit clock id)."""
    ensure_tid(tid)
    n = 0
    for c in tid:
        n = (n << 5) | _TID_VALUES[c]
    return n


def tid_to_timestamp_us(tid: str) -> int:
    """Microseconds since the Unix epoch encoded in a TID; ``SyntaxInvalid`` for a bad TID."""
    return tid_to_int(tid) >> 10


def make_tid(timestamp_us: int, clock_id: int) -> Tid:
    """The TID of a timestamp (0 <= us < 2**53) and clock id (0 <= id < 1024); ``ValueError`` else."""
    if not 0 <= timestamp_us < 1 << 53:
        raise ValueError(f"TID timestamp out of range: {timestamp_us}")
    if not 0 <= clock_id < 1 << 10:
        raise ValueError(f"TID clock id out of range: {clock_id}")
    n = (timestamp_us << 10) | clock_id
    return Tid("".join(TID_ALPHABET[(n >> shift) & 31] for shift in range(60, -1, -5)))
