"""Keys and signatures against the atproto interop crypto vectors and the reference PDS fixtures."""

from __future__ import annotations

import base64
from typing import Any

import coincurve
import libipld
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import crypto
from protocol.crypto import K256, P256, Curve, PrivateKey, PublicKey
from protocol.errors import InvalidKey
from tests.support.testdata import REFPDS_AUDIT_LOGS, REFPDS_DID_DOCS, VECTORS, load_json

CURVES: list[Curve] = [K256, P256]
ORDERS = {K256: crypto._N_K256, P256: crypto._N_P256}


def b64(text: str) -> bytes:
    """Standard or url-safe base64, padding optional (the fixtures omit it)."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@pytest.fixture(scope="module")
def signature_cases() -> list[dict[str, Any]]:
    cases = load_json(VECTORS / "crypto" / "signature-fixtures.json")
    assert len(cases) == 6
    return cases


def test_signature_fixtures(signature_cases: list[dict[str, Any]]) -> None:
    seen_tags: set[str] = set()
    for case in signature_cases:
        key = crypto.parse_did_key(case["publicKeyDid"])
        assert key.curve == {"ES256K": K256, "ES256": P256}[case["algorithm"]]
        assert key.did_key() == case["publicKeyDid"]
        legacy = crypto.parse_verification_method(
            {"type": case["didDocSuite"], "publicKeyMultibase": case["publicKeyMultibase"]}
        )
        assert legacy == key
        message, sig = b64(case["messageBase64"]), b64(case["signatureBase64"])
        assert key.verify(message, sig) is case["validSignature"], case["comment"]
        seen_tags.update(case["tags"])
    assert seen_tags == {"high-s", "der-encoded"}


def test_high_s_fixtures_verify_once_normalised(signature_cases: list[dict[str, Any]]) -> None:
    """The high-S cases fail only because of S: flipping S to n-S makes them verify."""
    high = [c for c in signature_cases if "high-s" in c["tags"]]
    assert len(high) == 2
    for case in high:
        key = crypto.parse_did_key(case["publicKeyDid"])
        sig = b64(case["signatureBase64"])
        n = ORDERS[key.curve]
        s = int.from_bytes(sig[32:], "big")
        assert s > n // 2
        low = sig[:32] + (n - s).to_bytes(32, "big")
        assert key.verify(b64(case["messageBase64"]), low)


def test_der_fixtures_are_rejected_not_raised(signature_cases: list[dict[str, Any]]) -> None:
    for case in (c for c in signature_cases if "der-encoded" in c["tags"]):
        sig = b64(case["signatureBase64"])
        assert sig[0] == 0x30 and len(sig) != 64
        assert crypto.parse_did_key(case["publicKeyDid"]).verify(b64(case["messageBase64"]), sig) is False


def test_w3c_did_key_k256() -> None:
    cases = load_json(VECTORS / "crypto" / "w3c_didkey_K256.json")
    assert len(cases) == 5
    for case in cases:
        priv = PrivateKey.from_bytes(K256, bytes.fromhex(case["privateKeyBytesHex"]))
        assert priv.public_key().did_key() == case["publicDidKey"]
        assert crypto.parse_did_key(case["publicDidKey"]) == priv.public_key()


def test_w3c_did_key_p256() -> None:
    cases = load_json(VECTORS / "crypto" / "w3c_didkey_P256.json")
    assert len(cases) == 1
    for case in cases:
        raw = crypto.b58decode(case["privateKeyBytesBase58"])
        priv = PrivateKey.from_bytes(P256, raw)
        assert priv.to_bytes() == raw
        assert priv.public_key().did_key() == case["publicDidKey"]
        assert crypto.parse_did_key(case["publicDidKey"]) == priv.public_key()


def test_reference_pds_did_docs_parse() -> None:
    docs = load_json(REFPDS_DID_DOCS)
    logs = load_json(REFPDS_AUDIT_LOGS)
    assert docs
    for did, doc in docs.items():
        (method,) = [vm for vm in doc["verificationMethod"] if vm["id"].endswith("#atproto")]
        key = crypto.parse_verification_method(method)
        assert key.curve == K256
        assert key.did_key().startswith("did:key:zQ3sh")
        if did in logs:  # the doc's (uncompressed, legacy) key is the PLC's current did:key
            assert key.did_key() == logs[did][-1]["operation"]["verificationMethods"]["atproto"]


def test_reference_plc_operation_signatures() -> None:
    """Real signatures: every PLC operation verifies under a rotation key of its predecessor."""
    logs = load_json(REFPDS_AUDIT_LOGS)
    checked = 0
    for entries in logs.values():
        previous: dict[str, Any] | None = None
        for entry in entries:
            op = dict(entry["operation"])
            sig = b64(op.pop("sig"))
            unsigned = libipld.encode_dag_cbor(op)
            signers = (previous or op)["rotationKeys"]
            assert any(crypto.load_did_key(k).verify(unsigned, sig) for k in signers), entry["cid"]
            assert not any(crypto.load_did_key(k).verify(unsigned + b"x", sig) for k in signers)
            previous = op
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("curve", CURVES)
def test_sign_verify_round_trip(curve: Curve) -> None:
    priv = PrivateKey.generate(curve)
    pub = crypto.parse_did_key(priv.public_key().did_key())
    assert pub.curve == curve
    for message in (b"", b"hello", bytes(range(256)) * 40):
        sig = priv.sign(message)
        assert len(sig) == 64
        assert int.from_bytes(sig[32:], "big") <= ORDERS[curve] // 2
        assert pub.verify(message, sig)
        assert pub.verify(message, bytearray(sig))
        assert pub.verify(message, memoryview(sig))
        assert not pub.verify(message + b"!", sig)
        assert not PrivateKey.generate(curve).public_key().verify(message, sig)


@pytest.mark.parametrize("curve", CURVES)
def test_p256_signing_normalises_high_s(curve: Curve) -> None:
    """OpenSSL emits high-S about half the time: 64 signatures must all come out low-S."""
    priv = PrivateKey.generate(curve)
    n = ORDERS[curve]
    for i in range(64):
        sig = priv.sign(i.to_bytes(2, "big"))
        assert int.from_bytes(sig[32:], "big") <= n // 2


@pytest.mark.parametrize("curve", CURVES)
def test_high_s_of_own_signature_fails(curve: Curve) -> None:
    priv = PrivateKey.generate(curve)
    sig = priv.sign(b"msg")
    n = ORDERS[curve]
    high = sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
    assert not priv.public_key().verify(b"msg", high)


def test_coincurve_itself_refuses_high_s() -> None:
    """Documents the library behaviour our explicit low-S check duplicates for K-256."""
    sk = coincurve.PrivateKey()
    sig = PrivateKey.from_bytes(K256, sk.secret).sign(b"msg")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    assert sk.public_key.verify(encode_dss_signature(r, s), b"msg")
    assert not sk.public_key.verify(encode_dss_signature(r, crypto._N_K256 - s), b"msg")


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize(
    "sig",
    [
        b"",
        b"\0" * 64,
        b"\xff" * 64,
        b"\0" * 63,
        b"\0" * 65,
        "not bytes",
        None,
    ],
)
def test_malformed_signatures_are_false_never_raise(curve: Curve, sig: Any) -> None:
    assert PrivateKey.generate(curve).public_key().verify(b"msg", sig) is False


@pytest.mark.parametrize("curve", CURVES)
def test_r_or_s_out_of_range_fails(curve: Curve) -> None:
    priv = PrivateKey.generate(curve)
    sig = priv.sign(b"msg")
    n = ORDERS[curve].to_bytes(32, "big")
    pub = priv.public_key()
    assert not pub.verify(b"msg", n + sig[32:])  # r = n
    assert not pub.verify(b"msg", sig[:32] + n)  # s = n


_KEYS = {curve: PrivateKey.generate(curve) for curve in CURVES}
_MESSAGE = b"a commit, more or less"
_SIGS = {curve: key.sign(_MESSAGE) for curve, key in _KEYS.items()}


@settings(max_examples=200, deadline=None)
@given(curve=st.sampled_from(CURVES), bit=st.integers(0, 64 * 8 - 1))
def test_any_flipped_signature_bit_fails(curve: Curve, bit: int) -> None:
    sig = bytearray(_SIGS[curve])
    sig[bit // 8] ^= 1 << (bit % 8)
    assert not _KEYS[curve].public_key().verify(_MESSAGE, bytes(sig))


@settings(max_examples=200, deadline=None)
@given(curve=st.sampled_from(CURVES), data=st.data())
def test_any_flipped_message_bit_fails(curve: Curve, data: st.DataObject) -> None:
    bit = data.draw(st.integers(0, len(_MESSAGE) * 8 - 1))
    message = bytearray(_MESSAGE)
    message[bit // 8] ^= 1 << (bit % 8)
    assert not _KEYS[curve].public_key().verify(bytes(message), _SIGS[curve])


@given(st.binary(max_size=80))
def test_base58_round_trip(data: bytes) -> None:
    assert crypto.b58decode(crypto.b58encode(data)) == data


def test_base58_known_values() -> None:
    assert crypto.b58encode(b"hello world") == "StV1DL6CwTryKyV"
    assert crypto.b58encode(b"\0\0\x01") == "112"
    assert crypto.b58decode("") == b""
    with pytest.raises(ValueError):
        crypto.b58decode("0OIl")


@pytest.mark.parametrize("curve", CURVES)
def test_uncompressed_keys_are_accepted_and_encode_compressed(curve: Curve) -> None:
    pub = PrivateKey.generate(curve).public_key()
    if curve == K256:
        uncompressed = coincurve.PublicKey(pub.to_bytes()).format(compressed=False)
    else:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub.to_bytes())
        uncompressed = point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert len(uncompressed) == 65
    codec = crypto._CODEC_K256 if curve == K256 else crypto._CODEC_P256
    again = crypto.parse_did_key("did:key:z" + crypto.b58encode(codec + uncompressed))
    assert again == pub
    assert again.did_key() == pub.did_key()
    assert len(crypto.b58decode(again.did_key()[9:])) == 35


def test_multikey_verification_method() -> None:
    pub = PrivateKey.generate(P256).public_key()
    vm = {"id": "#atproto", "type": "Multikey", "publicKeyMultibase": pub.multikey()}
    assert crypto.parse_verification_method(vm) == pub


@pytest.mark.parametrize(
    "text",
    [
        "",
        "did:key:",
        "did:key:z",
        "did:web:example.com",
        "did:key:Q3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc",  # no multibase prefix
        "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJw0",  # '0' is not base58
        "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJw",  # truncated
        "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",  # ed25519: unsupported
        "did:key:z" + "2" * 200,  # absurdly long
    ],
)
def test_malformed_did_keys_raise_invalid_key(text: str) -> None:
    with pytest.raises(InvalidKey) as info:
        crypto.parse_did_key(text)
    assert info.value.reason == "bad_key"


@pytest.mark.parametrize("curve", CURVES)
def test_off_curve_and_hybrid_points_raise_invalid_key(curve: Curve) -> None:
    pub = PrivateKey.generate(curve).public_key()
    compressed = pub.to_bytes()
    with pytest.raises(InvalidKey):
        crypto.public_key_from_bytes(curve, b"\x04" + compressed[1:] + compressed[1:])  # y not on curve
    with pytest.raises(InvalidKey):
        crypto.public_key_from_bytes(curve, b"\x05" + compressed[1:])
    if curve == K256:  # libsecp256k1 would accept the "hybrid" 06/07 form; we do not
        full = coincurve.PublicKey(compressed).format(compressed=False)
        with pytest.raises(InvalidKey):
            crypto.public_key_from_bytes(curve, bytes([6 | (full[-1] & 1)]) + full[1:])


@pytest.mark.parametrize(
    "vm",
    [
        {"type": "JsonWebKey2020", "publicKeyMultibase": "zQ3sh"},
        {"type": "Multikey"},
        {"type": "Multikey", "publicKeyMultibase": 5},
        {"type": "EcdsaSecp256k1VerificationKey2019", "publicKeyMultibase": "z111"},
        {"publicKeyMultibase": "zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc"},
    ],
)
def test_bad_verification_methods_raise_invalid_key(vm: dict[str, Any]) -> None:
    with pytest.raises(InvalidKey):
        crypto.parse_verification_method(vm)


def test_legacy_type_decides_the_curve(signature_cases: list[dict[str, Any]]) -> None:
    """A legacy type with a Multikey-style value is tolerated only when the codec matches."""
    for case in signature_cases[:2]:
        key = crypto.parse_did_key(case["publicKeyDid"])
        suite = case["didDocSuite"]
        other = next(t for t in crypto._LEGACY_VM_TYPES if t != suite)
        assert crypto.parse_verification_method({"type": suite, "publicKeyMultibase": key.multikey()}) == key
        with pytest.raises(InvalidKey):
            crypto.parse_verification_method({"type": other, "publicKeyMultibase": key.multikey()})


def test_load_did_key_caches() -> None:
    did_key = PrivateKey.generate(K256).public_key().did_key()
    first = crypto.load_did_key(did_key)
    assert crypto.load_did_key(did_key) is first
    assert crypto.load_did_key.cache_info().maxsize is not None


def test_keys_are_hashable_values() -> None:
    pub = PrivateKey.generate(K256).public_key()
    same = crypto.parse_did_key(pub.did_key())
    assert pub == same and hash(pub) == hash(same)
    assert len({pub, same}) == 1
    assert pub.did_key() in repr(pub)
    assert isinstance(pub, PublicKey)


def test_private_key_repr_hides_secret() -> None:
    priv = PrivateKey.generate(P256)
    assert priv.to_bytes().hex() not in repr(priv)


@pytest.mark.parametrize("curve", CURVES)
def test_bad_private_keys_raise(curve: Curve) -> None:
    for raw in (b"\0" * 32, b"\xff" * 32, b"\x01" * 31):
        with pytest.raises(InvalidKey):
            PrivateKey.from_bytes(curve, raw)
