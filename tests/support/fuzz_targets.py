"""Fuzz targets: one function per parser of upstream bytes, with its seeds and the errors it may raise.

A target takes bytes and returns when the parser accepted them or refused them the documented
way (a ``ProtocolError``: every ``protocol`` error type derives from it); anything else it
raises is a finding. Where a parser accepts, the target also checks a property of the result
(a round trip, agreement between two readers). ``scripts/fuzz.py`` runs these under atheris
(coverage-guided); ``tests/unit/test_parser_properties.py`` runs them on their seeds and on
hypothesis bytes. No I/O but reading the repository's vectors and recorded fixtures.

``frame_fields`` and ``mst_tree`` are structured. ``frame_fields`` reads its input as edits of a
recorded frame's fields (values of any type), which libipld's uninstrumented decoder would hide
from coverage guidance. ``mst_tree`` reads its input as a recipe for a set of blocks whose links
point at each other by real CIDs (byte mutation alone would never get past the hash checks),
then verifies that set as a repo and inverts operations on it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import libipld

from protocol import cbor, dagcbor
from protocol.car import iter_car_blocks, read_car, write_car
from protocol.cid import cid_for_dag_cbor, cid_for_raw, encode_varint
from protocol.commit import decode_commit, encode_commit
from protocol.crypto import P256, PrivateKey, PublicKey, parse_did_key, parse_multikey, parse_verification_method
from protocol.diddoc import decode_did_document, did_document_url, normalize_endpoint
from protocol.errors import ProtocolError
from protocol.frames import decode_frame, encode_frame, split_frame
from protocol.mst import build as mst_build
from protocol.mst_invert import Op, invert_ops
from protocol.mst_node import common_prefix_len, decode_node, encode_node, key_height, parse_node
from protocol.repo_verify import verify_record_proof, verify_repo
from tests.support.testdata import REFPDS_DID_DOCS, VECTORS, load_json, refpds_frames, refpds_repo_cars

Run = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    run: Run
    seeds: Callable[[], list[bytes]]


class Draw:
    """Choices read from fuzz bytes, one byte at a time; past the end every read gives zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        value = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return value

    def below(self, n: int) -> int:
        return self.byte() % n

    def chunk(self, max_len: int) -> bytes:
        size = min(self.below(max_len + 1), max(len(self.data) - self.pos, 0))
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out


# -- targets -----------------------------------------------------------------------------------


def frames(data: bytes) -> None:
    """``decode_frame``: a decoded event re-encodes to a frame that decodes to the same event."""
    try:
        event = decode_frame(data)
    except ProtocolError:
        return
    assert decode_frame(encode_frame(event)) == event


def _value(draw: Draw, depth: int = 0) -> object:
    """A data-model value of any type, small, drawn from the input."""
    kind = draw.below(8 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return draw.below(2) == 1
    if kind == 2:
        return int.from_bytes(draw.chunk(9), "big", signed=True)
    if kind == 3:
        return draw.chunk(16).decode("utf-8", "replace")
    if kind == 4:
        return draw.chunk(40)
    if kind == 5:
        return ("create", "update", "delete", "#commit", "#sync", "#identity", "#account", "#info")[draw.below(8)]
    if kind == 6:
        return [_value(draw, depth + 1) for _ in range(draw.below(4))]
    return {draw.chunk(6).decode("utf-8", "replace"): _value(draw, depth + 1) for _ in range(draw.below(4))}


@functools.cache
def _frame_parts() -> tuple[tuple[dict[str, object], dict[str, object]], ...]:
    return tuple(tuple(libipld.decode_dag_cbor_multi(raw)) for _, raw in refpds_frames())


def frame_fields(data: bytes) -> None:
    """A recorded frame with header, body or op fields replaced by values of any type, or removed
    (the first byte picks the frame): the ``frames`` checks on valid encodings of wrong values."""
    draw = Draw(data)
    parts = _frame_parts()
    header, body = (dict(part) for part in parts[draw.below(len(parts))])
    for _ in range(1 + draw.below(4)):
        where = draw.below(3)
        ops = body.get("ops")
        if where == 2 and isinstance(ops, list) and ops and isinstance(ops[0], dict):
            fields = dict(ops[0])
            body["ops"] = [fields, *ops[1:]]
        else:
            fields = header if where == 0 else body
        keys = sorted(fields)
        pick = draw.below(len(keys) + 1)
        key = keys[pick] if pick < len(keys) else draw.chunk(6).decode("utf-8", "replace")
        if draw.below(5) == 0:
            fields.pop(key, None)
        else:
            fields[key] = _value(draw)
    try:
        frame = bytes(libipld.encode_dag_cbor(header)) + bytes(libipld.encode_dag_cbor(body))
    except (ValueError, TypeError, OverflowError):
        return  # not encodable (an integer beyond 64 bits): no upstream can send it either
    frames(frame)


def cbor_fast(data: bytes) -> None:
    """The libipld wrappers in ``protocol.cbor``: one object, and a concatenation of objects."""
    for decode in (cbor.decode, cbor.decode_multi):
        try:
            decode(data)
        except ProtocolError:
            pass


def dagcbor_strict(data: bytes) -> None:
    """``protocol.dagcbor.decode``: what it accepts is canonical (re-encodes to the same bytes)
    and, when it keeps the data-model rules and has a JSON form, comes back from that form."""
    try:
        value = dagcbor.decode(data)
    except ProtocolError:
        return
    assert dagcbor.encode(value) == data
    if isinstance(value, dict):
        try:
            dagcbor.check_data_model(value)
            text = json.dumps(dagcbor.to_json(value))
        except ProtocolError:
            return
        assert dagcbor.from_json(json.loads(text)) == value


def car(data: bytes) -> None:
    """``read_car`` and ``iter_car_blocks`` agree; an accepted CAR written again reads the same."""
    try:
        parsed = read_car(data)
    except ProtocolError:
        try:
            list(iter_car_blocks(data))
        except ProtocolError:
            return
        raise AssertionError("iter_car_blocks accepted a CAR that read_car refused") from None
    assert dict(iter_car_blocks(data)) == parsed.blocks
    again = read_car(write_car(parsed.roots, parsed.blocks.items()))
    assert again == parsed


def mst_node(data: bytes) -> None:
    """``parse_node`` (strict and lenient) and ``decode_node``; a decoded node encodes again."""
    for strict in (True, False):
        try:
            parse_node(data, strict)
        except ProtocolError:
            pass
    try:
        node = decode_node(data)
    except ProtocolError:
        return
    assert decode_node(encode_node(node)) == node


def commit(data: bytes) -> None:
    """``decode_commit``: an accepted commit's unsigned bytes decode as a commit map without sig,
    and its signature (any bytes) checks to a bool under every recorded key, P-256 ones too."""
    for _, key in _repo_keys():
        assert key.verify(data[:64], data[64:]) in (True, False)
    try:
        parsed = decode_commit(data)
    except ProtocolError:
        return
    unsigned = libipld.decode_dag_cbor(parsed.unsigned)
    assert "sig" not in unsigned and unsigned["did"] == parsed.did and unsigned["rev"] == parsed.rev
    for _, key in _repo_keys():
        assert parsed.verify(key) in (True, False)


@functools.cache
def _dids() -> tuple[str, ...]:
    return (*load_json(REFPDS_DID_DOCS), "did:web:pds.example.com", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")


def did_document(data: bytes) -> None:
    """``decode_did_document`` (first byte picks the DID asked for), ``did_document_url`` and
    ``normalize_endpoint`` on the rest as text."""
    dids = _dids()
    did = dids[data[0] % len(dids)] if data else dids[0]
    try:
        decode_did_document(data[1:], did)
    except ProtocolError:
        pass
    text = data[1:].decode("utf-8", "replace")
    for insecure in (False, True):
        try:
            did_document_url(text, plc_url="https://plc.example.com", allow_insecure=insecure)
        except ProtocolError:
            pass
    normalize_endpoint(text)
    for parse in (parse_did_key, parse_multikey):
        try:
            parse(text)
        except ProtocolError:
            pass


@functools.cache
def _repo_keys() -> tuple[tuple[str, PublicKey], ...]:
    docs = load_json(REFPDS_DID_DOCS)
    out = []
    for did, doc in docs.items():
        method = next(m for m in doc["verificationMethod"] if m["id"].endswith("#atproto"))
        out.append((did, parse_verification_method(method)))
    out.append(("did:plc:p256p256p256p256p256p256", PrivateKey.from_bytes(P256, bytes(range(1, 33))).public_key()))
    return tuple(out)


def repo(data: bytes) -> None:
    """``verify_repo`` and ``verify_record_proof`` of a CAR (as getRepo and getRecord serve one)."""
    for did, key in _repo_keys():
        for check_key in (key, None):
            try:
                verify_repo(data, did, check_key)
            except ProtocolError:
                pass
        try:
            verify_record_proof(data, did, key, "app.bsky.actor.profile/self")
        except ProtocolError:
            pass


_KEY_BYTES = b"abc/._~:-19z"
_ACTIONS = ("create", "update", "delete", "")
_FUZZ_DID = "did:plc:fuzzfuzzfuzzfuzzfuzzfuzz"
_FUZZ_REV = "3kaaaaaaaaaaa"
_RECORDS = tuple(bytes(libipld.encode_dag_cbor({"$type": "app.bsky.feed.post", "n": n})) for n in range(4))
_RECORD_CIDS = tuple(cid_for_dag_cbor(block) for block in _RECORDS)


@functools.cache
def _key_pool() -> tuple[tuple[bytes, ...], ...]:
    """Valid repo paths by MST height (0, 1, 2), 24 of each, sorted: trees the input builds from
    them are often valid, so the checks past the first one get exercised too."""
    by_height: tuple[list[bytes], ...] = ([], [], [])
    n = 0
    while min(len(keys) for keys in by_height) < 24:
        key = f"app.bsky.feed.post/3k{n:011d}".encode()
        height = key_height(key)
        if height < 3 and len(by_height[height]) < 24:
            by_height[height].append(key)
        n += 1
    return tuple(tuple(sorted(keys)) for keys in by_height)


def _key(draw: Draw) -> bytes:
    if draw.below(8) == 0:
        return bytes(_KEY_BYTES[b % len(_KEY_BYTES)] for b in draw.chunk(12))  # any key, valid or not
    pool = _key_pool()[draw.below(3)]
    return pool[draw.below(len(pool))]


def _record_link(draw: Draw) -> bytes:
    pick = draw.below(len(_RECORD_CIDS) + 1)
    return _RECORD_CIDS[pick] if pick < len(_RECORD_CIDS) else cid_for_raw(bytes([draw.byte()]))  # absent


def _subtree(draw: Draw, built: list[tuple[bytes, int]], height: int) -> bytes | None:
    """Mostly null or a node one level down; sometimes any node, or a link to no block."""
    pick = draw.below(5)
    lower = [cid for cid, h in built if h == height - 1]
    if pick in (1, 2) and lower:
        return lower[draw.below(len(lower))]
    if pick == 3 and built:
        return built[draw.below(len(built))][0]
    if pick == 4:
        return cid_for_dag_cbor(bytes([draw.byte()]))
    return None


def _node(draw: Draw, built: list[tuple[bytes, int]]) -> tuple[bytes, int]:
    """(block, height): a node of keys of one height, correctly compressed unless the input
    asks for a flaw (unsorted keys, a wrong prefix length, any bytes at all)."""
    flaw = draw.below(16)
    height = draw.below(3)
    if flaw == 0:
        return draw.chunk(64), height
    pool = _key_pool()[height]
    keys = sorted({pool[draw.below(len(pool))] for _ in range(draw.below(5))})
    if flaw == 1:
        keys.reverse()
    if flaw == 2 and keys:
        keys[draw.below(len(keys))] = _key(draw)
    entries = []
    prev = b""
    for key in keys:
        p = draw.below(len(key) + 2) if flaw == 3 else common_prefix_len(prev, key)
        entries.append({"k": key[p:], "p": p, "t": _subtree(draw, built, height), "v": _record_link(draw)})
        prev = key
    return bytes(libipld.encode_dag_cbor({"e": entries, "l": _subtree(draw, built, height)})), height


def mst_tree(data: bytes) -> None:
    """Blocks built from the input that link to each other by real CIDs (the last is the root):
    ``verify_repo`` under a commit to them, and ``invert_ops`` of drawn operations on them."""
    draw = Draw(data)
    built: list[tuple[bytes, int]] = []
    blocks: dict[bytes, bytes] = dict(zip(_RECORD_CIDS, _RECORDS, strict=True))
    for _ in range(1 + draw.below(12)):
        block, height = _node(draw, built)
        cid = cid_for_dag_cbor(block)
        blocks[cid] = block
        built.append((cid, height))
    root = built[-1][0]
    ops = []
    for _ in range(draw.below(5)):
        action = _ACTIONS[draw.below(4)]  # "" too: an action no upstream op may carry
        value, prev = (_record_link(draw) if draw.below(4) else None for _ in range(2))
        ops.append(Op(action, _key(draw).decode(), value, prev))  # type: ignore[arg-type]
    for strict in (False, True):
        try:
            invert_ops(root, ops, blocks, strict=strict)
        except ProtocolError:
            pass
    commit_block = encode_commit(_FUZZ_DID, root, _FUZZ_REV, None, lambda _: bytes(64))
    commit_cid = cid_for_dag_cbor(commit_block)
    car_bytes = write_car([commit_cid], [(commit_cid, commit_block), *blocks.items()])
    require_records = draw.below(2) == 0
    try:
        verified = verify_repo(car_bytes, _FUZZ_DID, None, require_records=require_records)
    except ProtocolError:
        return
    assert set(verified.blocks) <= set(blocks) | {commit_cid}
    assert list(verified.records) == sorted(verified.records)
    assert not require_records or all(cid in verified.blocks for cid in verified.records.values())
    assert mst_build(list(verified.records.items()))[0] == root  # a verified tree is the canonical one


# -- seeds -------------------------------------------------------------------------------------


def _frame_seeds() -> list[bytes]:
    return [raw for _, raw in refpds_frames()]


def _car_seeds() -> list[bytes]:
    cars = [path.read_bytes() for path in refpds_repo_cars()]
    for _, raw in refpds_frames():
        _, body = split_frame(raw)
        if isinstance(body.get("blocks"), bytes):
            cars.append(body["blocks"])
    return cars


def _blocks_of(cars: list[bytes]) -> list[bytes]:
    return [block for data in cars for block in read_car(data).blocks.values()]


def _cbor_seeds() -> list[bytes]:
    import base64

    vectors = load_json(VECTORS / "data-model" / "data-model-fixtures.json")
    fixtures = [base64.b64decode(case["cbor_base64"] + "=" * (-len(case["cbor_base64"]) % 4)) for case in vectors]
    return fixtures + _blocks_of(_car_seeds()[:2]) + _frame_seeds()[:4]


def _commit_seeds() -> list[bytes]:
    return [block for block in _blocks_of(_car_seeds()) if b"version" in block and b"sig" in block]


def _did_document_seeds() -> list[bytes]:
    docs = load_json(REFPDS_DID_DOCS)
    texts = [b"did:web:localhost%3A2583", b"did:web:127.0.0.1%3A80", b"did:web:pds.example.com", *docs]
    return [bytes([i]) + json.dumps(doc).encode() for i, doc in enumerate(docs.values())] + [
        b"\x00" + (text.encode() if isinstance(text, str) else text) for text in texts
    ]


def _mst_tree_seeds() -> list[bytes]:
    return [bytes(range(256)), bytes(range(255, -1, -1)), encode_varint(2**40) * 40, b"\x07\x03" * 100]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("frames", frames, _frame_seeds),
        Target("frame_fields", frame_fields, lambda: [bytes([i]) for i in range(len(_frame_parts()))]),
        Target("cbor", cbor_fast, _cbor_seeds),
        Target("dagcbor", dagcbor_strict, _cbor_seeds),
        Target("car", car, _car_seeds),
        Target("mst_node", mst_node, lambda: _blocks_of(_car_seeds()[:2])),
        Target("commit", commit, _commit_seeds),
        Target("did_document", did_document, _did_document_seeds),
        Target("repo", repo, lambda: _car_seeds()[:2]),
        Target("mst_tree", mst_tree, _mst_tree_seeds),
    )
}
