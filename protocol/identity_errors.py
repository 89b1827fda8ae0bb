"""Errors of identity resolution: a DID that cannot be turned into a usable atproto identity.

All derive from ``IdentityError`` (itself a ``ProtocolError``), so a verifier that drops bad
upstream events can catch one class and use ``exc.reason`` as its drop-counter label. The
document errors are raised by ``protocol.diddoc``; ``IdentityUnavailable`` and
``IdentityNotFound`` are raised by the resolver (``actors.identity``), which does the I/O.
"""

from __future__ import annotations

from protocol.errors import ProtocolError


class IdentityError(ProtocolError):
    """Root of identity errors: the DID has no identity this relay can use right now."""

    reason = "bad_identity"


class UnsupportedDid(IdentityError):
    """A DID whose method or form this relay does not resolve (not did:plc / host-only did:web)."""

    reason = "unsupported_did"


class DidDocumentInvalid(IdentityError):
    """A DID document that is not a JSON object of the expected shape."""

    reason = "bad_did_doc"


class DidDocumentMismatch(DidDocumentInvalid):
    """A DID document whose ``id`` is not the DID that was asked for."""

    reason = "did_doc_mismatch"


class IdentityUnavailable(IdentityError):
    """No identity known and none could be fetched (directory down, timeout, server error)."""

    reason = "identity_unavailable"


class IdentityNotFound(IdentityUnavailable):
    """The directory answered that the DID does not exist or is tombstoned (404 / 410)."""

    reason = "identity_not_found"
