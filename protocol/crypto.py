"""Signing keys of atproto: parse did:key and Multikey public keys, verify low-S ECDSA signatures.

Two curves exist in atproto: K-256 (secp256k1, multicodec ``0xe7``) and P-256 (NIST
secp256r1, multicodec ``0x1200``). A signature is the 64-byte compact ``r || s`` over the
SHA-256 of the signed bytes, and only the low-S form is valid.

``PublicKey.verify`` always checks: the signature is exactly 64 bytes (so DER is refused),
``0 < r < n``, ``0 < s <= n/2`` (low-S, checked here for both curves even though libsecp256k1
also refuses high-S; OpenSSL does not), and the ECDSA equation. It does not check that the
key is the right one for a DID; that is the caller's business.

K-256 goes through ``coincurve`` (libsecp256k1, ~10x faster than OpenSSL for this curve) and
P-256 through ``cryptography``; both release the GIL while verifying. ``load_did_key`` caches
parsed keys, because loading a key costs several microseconds and one key signs many commits.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import coincurve
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.errors import InvalidKey

Curve = Literal["k256", "p256"]
K256: Curve = "k256"
P256: Curve = "p256"

DID_KEY_PREFIX = "did:key:"
SIGNATURE_LEN = 64

# Group orders of the two curves (SEC 2 / FIPS 186-4).
_N_K256 = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

# Unsigned-varint multicodec prefixes: secp256k1-pub 0xe7, p256-pub 0x1200.
_CODEC_K256 = b"\xe7\x01"
_CODEC_P256 = b"\x80\x24"
_CURVE_BY_CODEC: dict[bytes, Curve] = {_CODEC_K256: K256, _CODEC_P256: P256}

# did-doc verification method types of old PLC documents: multibase of the bare key bytes.
_LEGACY_VM_TYPES: dict[str, Curve] = {
    "EcdsaSecp256k1VerificationKey2019": K256,
    "EcdsaSecp256r1VerificationKey2019": P256,
}

# Longest multibase key text accepted: an uncompressed key with its codec is 67 bytes, ~92
# base58 characters. The bound keeps hostile input away from quadratic big-int conversion.
_MAX_MULTIBASE_LEN = 128
_KEY_CACHE_SIZE = 32_768

_ECDSA_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_VALUES = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin alphabet) text of ``data``; each leading zero byte becomes a ``1``."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Bytes of base58btc ``text``; raises ``ValueError`` on a character outside the alphabet."""
    n = 0
    try:
        for c in text:
            n = n * 58 + _B58_VALUES[c]
    except KeyError:
        raise ValueError(f"not a base58btc character: {c!r}") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def _decode_multibase_b58(text: str) -> bytes:
    """Bytes of a ``z``-prefixed (base58btc) multibase string, or ``InvalidKey``."""
    if not isinstance(text, str) or not text.startswith("z") or len(text) > _MAX_MULTIBASE_LEN:
        raise InvalidKey("key is not a base58btc multibase string ('z...') of sane length")
    try:
        return b58decode(text[1:])
    except ValueError as exc:
        raise InvalidKey(f"bad base58btc in key: {exc}") from None


def _check_point_encoding(data: bytes) -> None:
    """Accept SEC1 compressed (33 bytes, 02/03) or uncompressed (65 bytes, 04) points only."""
    if not ((len(data) == 33 and data[0] in (2, 3)) or (len(data) == 65 and data[0] == 4)):
        raise InvalidKey(f"public key is not a SEC1 compressed or uncompressed point ({len(data)} bytes)")


class PublicKey(ABC):
    """An atproto signing public key on one curve; immutable, hashable, safe to share and cache."""

    __slots__ = ("_compressed",)
    curve: ClassVar[Curve]
    _codec: ClassVar[bytes]
    _half_order: ClassVar[int]
    _order: ClassVar[int]

    def __init__(self, compressed: bytes) -> None:
        self._compressed = compressed

    def to_bytes(self) -> bytes:
        """The 33-byte SEC1 compressed point."""
        return self._compressed

    def multikey(self) -> str:
        """The Multikey ``publicKeyMultibase`` form: ``z`` + base58btc(multicodec + compressed)."""
        return "z" + b58encode(self._codec + self._compressed)

    def did_key(self) -> str:
        """The ``did:key:z...`` form, always with the compressed point."""
        return DID_KEY_PREFIX + self.multikey()

    def verify(self, data: bytes, sig: bytes | bytearray | memoryview) -> bool:
        """True when ``sig`` is a valid low-S compact signature of sha-256(``data``); never raises."""
        return self.verify_digest(hashlib.sha256(data).digest(), sig)

    def verify_digest(self, digest: bytes, sig: bytes | bytearray | memoryview) -> bool:
        """Like ``verify`` for an already computed 32-byte SHA-256 ``digest``."""
        if not isinstance(sig, bytes | bytearray | memoryview) or len(sig) != SIGNATURE_LEN:
            return False  # wrong type, wrong length, or DER (70-72 bytes)
        if len(digest) != 32:
            return False
        r = int.from_bytes(sig[:32], "big")
        s = int.from_bytes(sig[32:], "big")
        if not (0 < r < self._order and 0 < s <= self._half_order):
            return False  # out of range, or high-S (malleable, refused by atproto)
        return self._verify_der(encode_dss_signature(r, s), bytes(digest))

    @abstractmethod
    def _verify_der(self, der: bytes, digest: bytes) -> bool:
        """Curve-specific ECDSA check of a DER signature already known to be in range and low-S."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.curve == other.curve and self._compressed == other._compressed

    def __hash__(self) -> int:
        return hash((self.curve, self._compressed))

    def __repr__(self) -> str:
        return f"PublicKey({self.did_key()})"


class _K256PublicKey(PublicKey):
    __slots__ = ("_key",)
    curve = K256
    _codec = _CODEC_K256
    _order = _N_K256
    _half_order = _N_K256 // 2

    def __init__(self, key: coincurve.PublicKey, compressed: bytes | None = None) -> None:
        super().__init__(compressed or key.format(compressed=True))
        self._key = key

    def _verify_der(self, der: bytes, digest: bytes) -> bool:
        try:
            return bool(self._key.verify(der, digest, hasher=None))
        except ValueError:
            return False


class _P256PublicKey(PublicKey):
    __slots__ = ("_key",)
    curve = P256
    _codec = _CODEC_P256
    _order = _N_P256
    _half_order = _N_P256 // 2

    def __init__(self, key: ec.EllipticCurvePublicKey, compressed: bytes | None = None) -> None:
        super().__init__(compressed or key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint))
        self._key = key

    def _verify_der(self, der: bytes, digest: bytes) -> bool:
        try:
            self._key.verify(der, digest, _ECDSA_PREHASHED)
        except InvalidSignature:
            return False
        return True


def public_key_from_bytes(curve: Curve, data: bytes) -> PublicKey:
    """A public key from a SEC1 point (compressed or uncompressed); ``InvalidKey`` if off-curve."""
    _check_point_encoding(data)
    data = bytes(data)
    compressed = data if len(data) == 33 else None  # the parse validated it: no re-encoding
    try:
        if curve == K256:
            return _K256PublicKey(coincurve.PublicKey(data), compressed)
        if curve == P256:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
            return _P256PublicKey(key, compressed)
    except ValueError as exc:
        raise InvalidKey(f"{curve} public key is not a valid curve point: {exc}") from None
    raise InvalidKey(f"unsupported curve {curve!r}")


def parse_multikey(multibase: str) -> PublicKey:
    """A key from a Multikey ``publicKeyMultibase``: ``z`` + base58btc(multicodec varint + point)."""
    data = _decode_multibase_b58(multibase)
    curve = _CURVE_BY_CODEC.get(data[:2])
    if curve is None:
        raise InvalidKey(f"unsupported key multicodec (prefix {data[:2].hex() or 'empty'})")
    return public_key_from_bytes(curve, data[2:])


def parse_did_key(did_key: str) -> PublicKey:
    """A key from ``did:key:z...`` (K-256 or P-256); ``InvalidKey`` otherwise. Not cached."""
    if not isinstance(did_key, str) or not did_key.startswith(DID_KEY_PREFIX):
        raise InvalidKey("not a did:key")
    return parse_multikey(did_key[len(DID_KEY_PREFIX) :])


@functools.lru_cache(maxsize=_KEY_CACHE_SIZE)
def load_did_key(did_key: str) -> PublicKey:
    """``parse_did_key`` behind a bounded LRU cache (failures are not cached)."""
    return parse_did_key(did_key)


def parse_verification_method(vm: Mapping[str, Any]) -> PublicKey:
    """The key of one DID-document verification method.

    Accepts ``Multikey`` (multicodec-prefixed ``publicKeyMultibase``) and the legacy
    ``EcdsaSecp256k1VerificationKey2019`` / ``EcdsaSecp256r1VerificationKey2019`` types of old
    PLC documents, whose ``publicKeyMultibase`` holds the bare point (often uncompressed).
    """
    vm_type = vm.get("type")
    multibase = vm.get("publicKeyMultibase")
    if not isinstance(multibase, str):
        raise InvalidKey("verification method has no publicKeyMultibase string")
    if vm_type == "Multikey":
        return parse_multikey(multibase)
    curve = _LEGACY_VM_TYPES.get(vm_type) if isinstance(vm_type, str) else None
    if curve is None:
        raise InvalidKey(f"unsupported verification method type {vm_type!r}")
    data = _decode_multibase_b58(multibase)
    if _CURVE_BY_CODEC.get(data[:2]) == curve and len(data) in (35, 67):
        data = data[2:]  # a legacy type carrying a Multikey-style value: tolerate
    return public_key_from_bytes(curve, data)


class PrivateKey(ABC):
    """A signing key, for tests and benchmarks: signatures are 64-byte compact low-S ``r || s``."""

    __slots__ = ()
    curve: ClassVar[Curve]
    _order: ClassVar[int]

    @staticmethod
    def generate(curve: Curve) -> PrivateKey:
        """A fresh random key on ``curve``."""
        if curve == K256:
            return _K256PrivateKey(coincurve.PrivateKey())
        if curve == P256:
            return _P256PrivateKey(ec.generate_private_key(ec.SECP256R1()))
        raise InvalidKey(f"unsupported curve {curve!r}")

    @staticmethod
    def from_bytes(curve: Curve, raw: bytes) -> PrivateKey:
        """The key whose 32-byte big-endian secret scalar is ``raw``."""
        if len(raw) != 32:
            raise InvalidKey("a private key is 32 bytes")
        try:
            if curve == K256:
                return _K256PrivateKey(coincurve.PrivateKey(bytes(raw)))
            if curve == P256:
                return _P256PrivateKey(ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1()))
        except ValueError as exc:
            raise InvalidKey(f"bad {curve} private key: {exc}") from None
        raise InvalidKey(f"unsupported curve {curve!r}")

    @abstractmethod
    def to_bytes(self) -> bytes:
        """The 32-byte secret scalar."""

    @abstractmethod
    def public_key(self) -> PublicKey:
        """The matching public key."""

    @abstractmethod
    def _sign_der(self, data: bytes) -> bytes:
        """A DER ECDSA signature of sha-256(``data``)."""

    def sign(self, data: bytes) -> bytes:
        """A 64-byte compact low-S signature of sha-256(``data``)."""
        r, s = decode_dss_signature(self._sign_der(data))
        if s > self._order // 2:
            s = self._order - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:
        return f"PrivateKey({self.curve}, public={self.public_key().did_key()})"


class _K256PrivateKey(PrivateKey):
    __slots__ = ("_key",)
    curve = K256
    _order = _N_K256

    def __init__(self, key: coincurve.PrivateKey) -> None:
        self._key = key

    def to_bytes(self) -> bytes:
        return bytes(self._key.secret)

    def public_key(self) -> PublicKey:
        return _K256PublicKey(self._key.public_key)

    def _sign_der(self, data: bytes) -> bytes:
        return bytes(self._key.sign(data))  # RFC 6979 nonce; libsecp256k1 already emits low-S


class _P256PrivateKey(PrivateKey):
    __slots__ = ("_key",)
    curve = P256
    _order = _N_P256

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def to_bytes(self) -> bytes:
        return self._key.private_numbers().private_value.to_bytes(32, "big")

    def public_key(self) -> PublicKey:
        return _P256PublicKey(self._key.public_key())

    def _sign_der(self, data: bytes) -> bytes:
        return self._key.sign(data, _ECDSA_SHA256)  # OpenSSL may emit high-S: sign() normalises
