"""Exception hierarchy of the protocol package: one root, one subclass per condition.

Every error carries a short ``reason`` slug. Callers that drop bad upstream data use it as
the ``reason`` label of their drop counters, so slugs are stable, lower-case and few.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised by ``protocol``: the input was not valid atproto data."""

    reason = "invalid"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class CborError(ProtocolError):
    """Bytes that are not strict DAG-CBOR (truncated, non-canonical, floats, bad tags...)."""

    reason = "bad_cbor"


class CidError(ProtocolError):
    """A malformed or unsupported CID (version, codec, hash function, length)."""

    reason = "bad_cid"


class CarError(ProtocolError):
    """A malformed CAR file: bad varint, header, truncated block, missing root."""

    reason = "bad_car"


class BlockHashMismatch(CarError):
    """A block whose bytes do not hash to the CID it is stored under."""

    reason = "bad_block_hash"


class MissingBlock(ProtocolError):
    """A block needed to walk a structure (MST node, commit, record) is absent."""

    reason = "missing_block"


class MstError(ProtocolError):
    """A malformed MST node or a tree that breaks MST invariants (order, heights)."""

    reason = "bad_mst"


class InversionMismatch(MstError):
    """Inverting a commit's operations did not reproduce the commit's ``prevData``."""

    reason = "bad_prev_data"


class CommitError(ProtocolError):
    """A commit object that does not have the version 3 shape."""

    reason = "bad_commit"


class InvalidKey(ProtocolError):
    """A public key (did:key or Multikey) that cannot be parsed or is of an unsupported curve."""

    reason = "bad_key"


class SignatureError(ProtocolError):
    """A signature that is malformed (DER, wrong length, high-S) or does not verify."""

    reason = "bad_signature"


class SyntaxInvalid(ProtocolError):
    """A DID, handle, NSID, record key, TID, AT-URI, CID or datetime with invalid syntax."""

    reason = "bad_syntax"


class FrameError(ProtocolError):
    """A firehose frame that cannot be decoded into an event (bad header, missing field)."""

    reason = "bad_frame"


class UnknownFrameType(FrameError):
    """A well-formed frame whose ``t`` is not one this relay knows (future protocol)."""

    reason = "unknown_type"


class FrameTooLarge(FrameError):
    """A frame or block larger than the configured limit."""

    reason = "too_large"
