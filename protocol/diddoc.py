"""DID documents: parse one into the ``Identity`` a relay needs, and say where to fetch it.

An ``Identity`` holds what verification uses: the DID, its handle claim, the ``#atproto``
signing key (as a ``did:key``) and the ``#atproto_pds`` endpoint. No I/O happens here.

``parse_did_document`` always checks: the document is a JSON object whose ``id`` is the
requested DID, and that ``alsoKnownAs``, ``verificationMethod`` and ``service`` (when present)
are lists. It is lenient about the parts it extracts, as atproto asks: a missing or
malformed handle, key or endpoint becomes ``None`` (the account then cannot pass the check
that needs it) rather than making the whole identity unusable. It does not check that the
handle resolves back to the DID (a relay does not use handles), nor a PLC operation log.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from protocol.crypto import PublicKey, load_did_key, parse_verification_method
from protocol.errors import InvalidKey
from protocol.identity_errors import DidDocumentInvalid, DidDocumentMismatch, UnsupportedDid
from protocol.syntax import Did, Handle, is_valid_did, is_valid_handle

ATPROTO_KEY_FRAGMENT = "#atproto"
ATPROTO_PDS_FRAGMENT = "#atproto_pds"
PDS_SERVICE_TYPE = "AtprotoPersonalDataServer"

_PLC_RE = re.compile(r"did:plc:[a-z2-7]{24}")
_IPV4_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")  # ASCII digits: \d also matches other scripts


@dataclass(frozen=True, slots=True)
class Identity:
    """What a relay knows about one DID: handle claim, signing key and PDS, each maybe absent."""

    did: Did
    handle: Handle | None
    signing_key: str | None  # "did:key:z..." of the #atproto verification method
    pds_endpoint: str | None  # "https://pds.example.com", no trailing slash

    def public_key(self) -> PublicKey | None:
        """The parsed signing key (cached by ``load_did_key``), or ``None`` if absent or bad."""
        if self.signing_key is None:
            return None
        try:
            return load_did_key(self.signing_key)
        except InvalidKey:
            return None


DidDocument = Identity  # the parsed form of a DID document, under the name the specs use


def parse_did_document(doc: object, did: str) -> Identity:
    """The identity in ``doc`` (a decoded JSON value) fetched for ``did``.

    Raises ``DidDocumentMismatch`` when ``doc["id"]`` is not ``did`` and ``DidDocumentInvalid``
    when ``doc`` is not an object or a list-valued field is not a list.
    """
    if not isinstance(doc, Mapping):
        raise DidDocumentInvalid(f"DID document of {did} is not a JSON object")
    doc_id = doc.get("id")
    if doc_id != did:
        raise DidDocumentMismatch(f"DID document id {str(doc_id)[:200]!r} is not {did}")
    return Identity(
        did=Did(did),
        handle=_handle(_list_field(doc, "alsoKnownAs", did)),
        signing_key=_signing_key(_list_field(doc, "verificationMethod", did), did),
        pds_endpoint=_pds_endpoint(_list_field(doc, "service", did), did),
    )


def decode_did_document(body: bytes, did: str) -> tuple[Identity, str]:
    """Parse the JSON bytes of a fetched document: its identity and a compact JSON text of it."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DidDocumentInvalid(f"DID document of {did} is not JSON: {type(exc).__name__}") from None
    identity = parse_did_document(doc, did)
    return identity, json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _list_field(doc: Mapping[str, Any], name: str, did: str) -> list[Any]:
    value = doc.get(name, [])
    if not isinstance(value, list):
        raise DidDocumentInvalid(f"DID document of {did}: {name} is not a list")
    return value


def _matches_fragment(entry_id: object, did: str, fragment: str) -> bool:
    return entry_id == fragment or entry_id == did + fragment


def _handle(also_known_as: list[Any]) -> Handle | None:
    """The first ``at://`` entry is the handle claim; an invalid one means no handle."""
    for entry in also_known_as:
        if isinstance(entry, str) and entry.startswith("at://"):
            handle = entry[len("at://") :]
            return Handle(handle.lower()) if is_valid_handle(handle) else None
    return None


def _signing_key(methods: list[Any], did: str) -> str | None:
    for method in methods:
        if isinstance(method, Mapping) and _matches_fragment(method.get("id"), did, ATPROTO_KEY_FRAGMENT):
            try:
                return parse_verification_method(method).did_key()
            except InvalidKey:
                return None
    return None


def _pds_endpoint(services: list[Any], did: str) -> str | None:
    for service in services:
        if isinstance(service, Mapping) and _matches_fragment(service.get("id"), did, ATPROTO_PDS_FRAGMENT):
            if service.get("type") != PDS_SERVICE_TYPE:
                return None
            return normalize_endpoint(service.get("serviceEndpoint"))
    return None


def normalize_endpoint(value: object) -> str | None:
    """``scheme://host[:port][/path]`` with scheme and host lower-cased and no trailing slash.

    ``None`` for anything that is not an absolute http(s) URL with a host and without
    credentials, query or fragment.
    """
    if not isinstance(value, str) or len(value) > 2048:
        return None
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    if parts.query or parts.fragment:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return sys.intern(f"{scheme}://{netloc}{parts.path.rstrip('/')}")


def did_document_url(did: str, *, plc_url: str, allow_insecure: bool = False) -> str:
    """Where the document of ``did`` lives: ``{plc_url}/{did}`` or ``https://{host}/.well-known/did.json``.

    did:web is accepted in its host-only form (atproto does not use path-based did:web). In
    secure mode the host must be a domain name and no port is allowed; ``allow_insecure``
    (development and tests) switches to ``http`` and also accepts ``localhost``, IPv4
    literals and a port encoded as ``%3A``. Raises ``UnsupportedDid`` otherwise.
    """
    if not is_valid_did(did):
        raise UnsupportedDid(f"not a valid DID: {did[:100]!r}")
    if did.startswith("did:plc:"):
        if _PLC_RE.fullmatch(did) is None:
            raise UnsupportedDid(f"malformed did:plc: {did[:100]!r}")
        return f"{plc_url.rstrip('/')}/{did}"
    if did.startswith("did:web:"):
        scheme = "http" if allow_insecure else "https"
        return f"{scheme}://{_did_web_authority(did, allow_insecure)}/.well-known/did.json"
    raise UnsupportedDid(f"unsupported DID method: {did.split(':')[1]}")


def _did_web_authority(did: str, allow_insecure: bool) -> str:
    encoded = did[len("did:web:") :]
    if ":" in encoded:
        raise UnsupportedDid(f"path-based did:web is not used by atproto: {did[:100]!r}")
    authority = unquote(encoded).lower()
    host, sep, port = authority.partition(":")
    if sep:
        if not allow_insecure:
            raise UnsupportedDid(f"did:web with a port is for development only: {did[:100]!r}")
        if not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
            raise UnsupportedDid(f"did:web has a bad port: {did[:100]!r}")
    if is_valid_handle(host) or (allow_insecure and (host == "localhost" or _IPV4_RE.fullmatch(host))):
        return f"{host}:{int(port)}" if sep else host
    raise UnsupportedDid(f"did:web host is not an allowed domain name: {did[:100]!r}")
