"""DID documents: real PLC documents, Multikey and legacy keys, lenient fields, document URLs."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from protocol.crypto import K256, P256, PrivateKey
from protocol.diddoc import Identity, decode_did_document, did_document_url, normalize_endpoint, parse_did_document
from protocol.identity_errors import DidDocumentInvalid, DidDocumentMismatch, IdentityError, UnsupportedDid
from tests.support.fake_plc import make_did_doc, new_plc_did
from tests.support.testdata import REFPDS_AUDIT_LOGS, REFPDS_DID_DOCS, load_json


def test_real_plc_documents_match_their_latest_plc_operation() -> None:
    docs: dict[str, Any] = load_json(REFPDS_DID_DOCS)
    logs: dict[str, Any] = load_json(REFPDS_AUDIT_LOGS)
    assert docs
    for did, doc in docs.items():
        identity = parse_did_document(doc, did)
        op = [entry for entry in logs[did] if not entry["nullified"]][-1]["operation"]
        assert identity.did == did
        assert identity.signing_key == op["verificationMethods"]["atproto"]  # legacy type -> did:key
        assert identity.handle == op["alsoKnownAs"][0].removeprefix("at://")
        assert identity.pds_endpoint == op["services"]["atproto_pds"]["endpoint"].rstrip("/")
        key = identity.public_key()
        assert key is not None and key.did_key() == identity.signing_key


@pytest.mark.parametrize("curve", [K256, P256])
def test_multikey_document_gives_a_key_that_verifies(curve: str) -> None:
    private = PrivateKey.generate(curve)  # type: ignore[arg-type]
    did = new_plc_did()
    doc = make_did_doc(did, private.public_key().did_key(), "https://pds.example.com/", handle="Alice.Example.com")
    identity = parse_did_document(doc, did)
    assert identity == Identity(did, "alice.example.com", private.public_key().did_key(), "https://pds.example.com")  # type: ignore[arg-type]
    key = identity.public_key()
    assert key is not None and key.verify(b"commit bytes", private.sign(b"commit bytes"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.handle = None  # type: ignore[misc]


def _doc(did: str, **fields: Any) -> dict[str, Any]:
    doc = make_did_doc(did, PrivateKey.generate(K256).public_key().did_key(), "https://pds.example.com", handle="a.b.c")
    doc.update(fields)
    return doc


def test_key_fragment_may_be_relative_or_absolute_but_not_another_dids() -> None:
    did = new_plc_did()
    doc = _doc(did)
    method = doc["verificationMethod"][0]
    for vm_id, expect_key in (("#atproto", True), (f"{did}#atproto", True), (f"{new_plc_did()}#atproto", False)):
        method["id"] = vm_id
        assert (parse_did_document(doc, did).signing_key is not None) is expect_key, vm_id


@pytest.mark.parametrize(
    "method",
    [
        {"id": "#atproto", "type": "Multikey", "publicKeyMultibase": "zNotBase58!"},
        {"id": "#atproto", "type": "Multikey"},
        {"id": "#atproto", "type": "Ed25519VerificationKey2020", "publicKeyMultibase": "z6Mkf5rGMoatrSj1f4"},
        {"id": "#other", "type": "Multikey", "publicKeyMultibase": "zQ3shXcQDkKJxq7Z631HafzdtTfzRaN1VpJMFMQC8V2o8J2Wq"},
        "not an object",
    ],
)
def test_missing_or_unusable_key_gives_no_signing_key(method: Any) -> None:
    did = new_plc_did()
    identity = parse_did_document(_doc(did, verificationMethod=[method]), did)
    assert identity.signing_key is None and identity.public_key() is None
    assert identity.handle == "a.b.c"  # the rest of the document still counts


@pytest.mark.parametrize(
    ("aka", "handle"),
    [
        (["at://first.example.com", "at://second.example.com"], "first.example.com"),
        (["https://elsewhere.example", "at://Mixed.Case.COM"], "mixed.case.com"),
        (["at://not a handle"], None),
        (["at://single"], None),
        (["https://only.web"], None),
        ([], None),
    ],
)
def test_handle_is_the_first_at_uri_when_valid(aka: list[str], handle: str | None) -> None:
    did = new_plc_did()
    assert parse_did_document(_doc(did, alsoKnownAs=aka), did).handle == handle


@pytest.mark.parametrize(
    ("service", "endpoint"),
    [
        (
            {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://PDS.Example.com/"},
            "https://pds.example.com",
        ),
        (
            {"id": "DID#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "http://localhost:2583"},
            "http://localhost:2583",
        ),
        ({"id": "#atproto_pds", "type": "SomethingElse", "serviceEndpoint": "https://pds.example.com"}, None),
        ({"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "ftp://pds.example.com"}, None),
        ({"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": {"uri": "x"}}, None),
        ({"id": "#atproto_labeler", "type": "AtprotoLabeler", "serviceEndpoint": "https://l.example.com"}, None),
    ],
)
def test_pds_endpoint_is_the_typed_atproto_pds_service_normalized(
    service: dict[str, Any], endpoint: str | None
) -> None:
    did = new_plc_did()
    service = {**service, "id": service["id"].replace("DID", did)}
    assert parse_did_document(_doc(did, service=[service]), did).pds_endpoint == endpoint


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("https://pds.example.com", "https://pds.example.com"),
        ("HTTPS://Pds.Example.com:8443/base/", "https://pds.example.com:8443/base"),
        ("https://user:pw@pds.example.com", None),
        ("https://pds.example.com/?q=1", None),
        ("https://pds.example.com:99999", None),
        ("pds.example.com", None),
        ("https://", None),
    ],
)
def test_normalize_endpoint(raw: str, normal: str | None) -> None:
    assert normalize_endpoint(raw) == normal


def test_document_for_another_did_is_refused() -> None:
    did = new_plc_did()
    with pytest.raises(DidDocumentMismatch) as err:
        parse_did_document(_doc(new_plc_did()), did)
    assert err.value.reason == "did_doc_mismatch"
    assert isinstance(err.value, IdentityError)


@pytest.mark.parametrize(
    "doc",
    [[], "text", None, {"alsoKnownAs": []}, {"id": "DID", "alsoKnownAs": "at://a.b.c"}, {"id": "DID", "service": {}}],
)
def test_malformed_documents_are_refused(doc: Any) -> None:
    did = new_plc_did()
    if isinstance(doc, dict) and doc.get("id") == "DID":
        doc = {**doc, "id": did}
    with pytest.raises(DidDocumentInvalid):
        parse_did_document(doc, did)


def test_decode_document_bytes() -> None:
    did = new_plc_did()
    doc = _doc(did)
    identity, text = decode_did_document(json.dumps(doc, indent=2).encode(), did)
    assert identity == parse_did_document(doc, did)
    assert json.loads(text) == doc and "\n" not in text
    for body in (b"<html>", b"\xff\xfe\x00", b"[" * 100_000):
        with pytest.raises(DidDocumentInvalid):
            decode_did_document(body, did)


def test_document_urls() -> None:
    plc = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
    assert did_document_url(plc, plc_url="https://plc.directory/") == f"https://plc.directory/{plc}"
    assert did_document_url("did:web:Example.com", plc_url="x") == "https://example.com/.well-known/did.json"
    assert (
        did_document_url("did:web:localhost%3A2583", plc_url="x", allow_insecure=True)
        == "http://localhost:2583/.well-known/did.json"
    )
    assert (
        did_document_url("did:web:127.0.0.1%3A80", plc_url="x", allow_insecure=True)
        == "http://127.0.0.1:80/.well-known/did.json"
    )


@pytest.mark.parametrize(
    ("did", "insecure"),
    [
        ("did:plc:short", False),
        ("did:plc:EWVI7NXZYOUN6ZHXRHS64OIZ", False),
        ("did:key:zQ3shXcQDkKJxq7Z631HafzdtTfzRaN1VpJMFMQC8V2o8J2Wq", False),
        ("did:web:example.com%3A8443", False),  # ports are for development only
        ("did:web:localhost", False),
        ("did:web:127.0.0.1", False),
        ("did:web:example.com:users:alice", True),  # path-based did:web
        ("did:web:localhost%3Aabc", True),
        ("did:web:localhost%3A0", True),
        ("did:web:bad_host", True),
        ("not a did", True),
        # test_parser_properties.py::test_did_web_authority_is_ascii_or_refused finds these: a
        # superscript "port" raised ValueError; other scripts' digits, as a port or an IPv4
        # literal, were accepted ("١٢" became port 12)
        ("did:web:localhost%3A%C2%B2", True),
        ("did:web:localhost%3A%D9%A1%D9%A2", True),
        ("did:web:localhost%3A%EF%BC%98%EF%BC%90", True),
        ("did:web:%D9%A1%D9%A2%D9%A3.1.1.1", True),
        ("did:web:localhost%3A000000000080", True),  # a port has at most 5 digits
    ],
)
def test_unresolvable_dids(did: str, insecure: bool) -> None:
    with pytest.raises(UnsupportedDid) as err:
        did_document_url(did, plc_url="https://plc.directory", allow_insecure=insecure)
    assert err.value.reason == "unsupported_did"
