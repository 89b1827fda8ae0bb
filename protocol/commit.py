"""Signed repo commits (version 3): decode a commit block, its unsigned bytes, verify the signature.

A commit is ``{did, version: 3, data: link, rev: TID, prev: link|null, sig: bytes}``. The
signature covers the DAG-CBOR encoding of the same map without ``sig``. The raw block bytes
are kept as they came: never re-encode a decoded signed commit (see HACKING.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import libipld

from protocol.errors import CborError, CommitError

_TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
_COMMIT_FIELDS = frozenset(("did", "version", "data", "rev", "prev", "sig"))


class Verifier(Protocol):
    def verify(self, data: bytes, sig: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class Commit:
    did: str
    version: int
    data: bytes
    rev: str
    prev: bytes | None
    sig: bytes
    unsigned: bytes

    def verify(self, key: Verifier) -> bool:
        """True when ``sig`` is a valid low-S signature of the unsigned commit by ``key``."""
        return key.verify(self.unsigned, self.sig)


def _link(value: Any, field: str) -> bytes:
    if not isinstance(value, bytes) or len(value) < 5 or value[0] != 1:
        raise CommitError(f"commit field {field!r} must be a CID link")
    return value


def decode_commit(block: bytes) -> Commit:
    """Parse a commit block; ``CommitError`` when it is not a well-formed version 3 commit."""
    try:
        obj = libipld.decode_dag_cbor(block)
    except (ValueError, RecursionError, TypeError, OverflowError) as exc:
        raise CborError(f"commit block is not DAG-CBOR: {exc}") from None
    if not isinstance(obj, dict):
        raise CommitError("commit is not a map")
    extra = obj.keys() - _COMMIT_FIELDS
    if extra:
        raise CommitError(f"commit has unknown fields {sorted(extra)}")
    did = obj.get("did")
    if not isinstance(did, str) or not did.startswith("did:") or len(did) > 2048:
        raise CommitError("commit did is missing or not a DID")
    version = obj.get("version")
    if version != 3 or isinstance(version, bool):
        raise CommitError(f"unsupported commit version {version!r}", reason="bad_commit_version")
    rev = obj.get("rev")
    if not isinstance(rev, str) or not _TID_RE.match(rev):
        raise CommitError("commit rev is not a TID", reason="bad_rev")
    sig = obj.get("sig")
    if not isinstance(sig, bytes):
        raise CommitError("commit has no signature bytes", reason="bad_signature")
    if "prev" not in obj:
        raise CommitError("commit has no prev field")
    prev = obj["prev"]
    unsigned_map = {k: v for k, v in obj.items() if k != "sig"}
    return Commit(
        did=did,
        version=3,
        data=_link(obj.get("data"), "data"),
        rev=rev,
        prev=None if prev is None else _link(prev, "prev"),
        sig=sig,
        unsigned=libipld.encode_dag_cbor(unsigned_map),
    )


def encode_commit(did: str, data: bytes, rev: str, prev: bytes | None, sign: Any) -> bytes:
    """Build and sign a commit block with ``sign(unsigned_bytes) -> sig`` (tools and tests).

    The signed map is assembled field by field so that a signature which happens to parse as
    a CID is still written as a byte string (libipld would write it as a link).
    """
    enc = libipld.encode_dag_cbor
    unsigned = {"did": did, "version": 3, "data": data, "rev": rev, "prev": prev}
    sig = sign(enc(unsigned))
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise CommitError("signer must return 64 signature bytes")
    # canonical order: shorter keys first, then bytewise: did, rev, sig, data, prev, version
    parts = [b"\xa6", enc("did"), enc(did), enc("rev"), enc(rev), enc("sig"), b"\x58\x40" + sig]
    parts += [enc("data"), enc(data), enc("prev"), enc(prev), enc("version"), enc(3)]
    return b"".join(parts)
