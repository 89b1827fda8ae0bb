"""Every parser of upstream or client bytes, on arbitrary bytes, mutated valid inputs and hostile fields:
it accepts, or refuses with its documented error type, and never raises anything else.

The targets are the ones ``scripts/fuzz.py`` runs under atheris (``tests/support/fuzz_targets.py``,
``tests/support/fuzz_xrpc.py``); each also checks a property of what it accepts (a round trip,
two readers agreeing). Seeds are the interop vectors and the recorded reference-PDS fixtures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import libipld
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.diddoc import did_document_url, parse_did_document
from protocol.identity_errors import IdentityError, UnsupportedDid
from tests.support import fuzz_xrpc
from tests.support.fuzz_targets import TARGETS, Target
from tests.support.testdata import REFPDS_DID_DOCS, load_json, refpds_frames

EXAMPLES = 150
NAMES = sorted(TARGETS)


def mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with one to six edits: a byte set, a range deleted, bytes inserted, a cut, a slice
    repeated, or the tail of another seed spliced in."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(data)))
            kind = draw(st.integers(0, 5))
            if kind == 0 and at < len(data):
                data[at] = draw(st.integers(0, 255))
            elif kind == 1:
                del data[at : at + draw(st.integers(1, 16))]
            elif kind == 2:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == 3:
                del data[at:]
            elif kind == 4:
                data[at:at] = data[at : at + draw(st.integers(1, 32))] * draw(st.integers(1, 4))
            else:
                other = draw(st.sampled_from(seeds))
                data[at:] = other[draw(st.integers(0, len(other))) :]
        return bytes(data)

    return mutate()


def target(name: str) -> Target:
    return TARGETS[name]


@pytest.mark.parametrize("name", NAMES)
def test_every_seed_passes(name: str) -> None:
    seeds = target(name).seeds()
    assert seeds
    for seed in seeds:
        target(name).run(seed)


# Inputs on which a target failed, each fixed in the code it names (a regression test each).
FOUND = [
    # protocol/dagcbor.py to_json: a map with a "$bytes"/"$link" key came back from JSON as bytes/a link
    ("dagcbor", bytes.fromhex("a1662462797465736441414141")),
]


@pytest.mark.parametrize(("name", "data"), FOUND, ids=[f"{name}-{i}" for i, (name, _) in enumerate(FOUND)])
def test_found_by_fuzzing(name: str, data: bytes) -> None:
    target(name).run(data)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(name: str, data: bytes) -> None:
    target(name).run(data)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_mutated_valid_inputs(name: str, data: st.DataObject) -> None:
    seeds = target(name).seeds()
    target(name).run(data.draw(mutations(seeds)))


# -- hostile fields: valid encodings of the wrong values ---------------------------------------

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _bodies() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [tuple(libipld.decode_dag_cbor_multi(raw)) for _, raw in refpds_frames()]


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(st.data())
def test_frames_with_hostile_field_values(data: st.DataObject) -> None:
    """A recorded frame with some header, body or op fields replaced by any values (or removed)."""
    header, body = data.draw(st.sampled_from(_bodies()))
    header, body = dict(header), dict(body)
    for _ in range(data.draw(st.integers(1, 3))):
        part = data.draw(st.sampled_from(["header", "body", "op"]))
        ops = body.get("ops")
        if part == "op" and isinstance(ops, list) and any(isinstance(op, dict) for op in ops):
            ops = [dict(op) if isinstance(op, dict) else op for op in ops]
            op = data.draw(st.sampled_from([op for op in ops if isinstance(op, dict)]))
            op[data.draw(st.sampled_from([*op, "extra"]))] = data.draw(values)
            body["ops"] = ops
            continue
        fields = header if part == "header" else body
        key = data.draw(st.sampled_from([*fields, "extra"]))
        if data.draw(st.booleans()):
            fields[key] = data.draw(values)
        else:
            fields.pop(key, None)
    try:
        frame = bytes(libipld.encode_dag_cbor(header)) + bytes(libipld.encode_dag_cbor(body))
    except (ValueError, TypeError, OverflowError):
        return  # not encodable (an integer beyond 64 bits): no upstream can send it either
    target("frames").run(frame)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(st.data())
def test_did_documents_with_hostile_field_values(data: st.DataObject) -> None:
    """A recorded DID document with fields (top level or inside its lists) replaced by any JSON."""
    docs: dict[str, Any] = load_json(REFPDS_DID_DOCS)
    did = data.draw(st.sampled_from(sorted(docs)))
    doc = json.loads(json.dumps(docs[did]))
    for _ in range(data.draw(st.integers(1, 3))):
        container: Any = doc
        listed = [k for k, v in doc.items() if isinstance(v, list) and v]
        if data.draw(st.booleans()) and listed:
            container = data.draw(st.sampled_from(doc[data.draw(st.sampled_from(listed))]))
        if isinstance(container, dict):
            container[data.draw(st.sampled_from([*container, "id", "type", "serviceEndpoint"]))] = data.draw(
                json_values
            )
    try:
        identity = parse_did_document(doc, did)
    except IdentityError:
        return
    assert identity.did == did
    target("did_document").run(b"\x00" + json.dumps(doc).encode())


digits = st.characters(categories=["Nd", "No"])  # every script's digits, superscripts too


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(
    host=st.sampled_from(["localhost", "example.com"]) | st.text(digits | st.just("."), min_size=1, max_size=15),
    port=st.none() | st.text(digits | st.sampled_from("0123456789:a"), max_size=7),
    insecure=st.booleans(),
)
def test_did_web_authority_is_ascii_or_refused(host: str, port: str | None, insecure: bool) -> None:
    """A did:web (host and port percent-encoded) gives an http(s) URL with an ASCII authority and
    port, or UnsupportedDid; the DID's own text never reaches a URL in another script."""
    did = "did:web:" + quote(host if port is None else f"{host}:{port}", safe=".")
    try:
        url = did_document_url(did, plc_url="https://plc.example.com", allow_insecure=insecure)
    except UnsupportedDid:
        return
    parts = urlsplit(url)
    assert parts.netloc.isascii() and parts.hostname
    assert parts.port is None or 0 < parts.port < 65536
    assert port is None or parts.netloc.endswith(f":{port}")


# -- XRPC parameters through the app's routes ----------------------------------------------------


@pytest.fixture(scope="module")
def xrpc() -> Iterator[fuzz_xrpc.XrpcApp]:
    app = fuzz_xrpc.XrpcApp()
    yield app
    app.close()


PARAMS = ["did", "limit", "cursor", "hostname", "since", "collection", "rkey", "cids", "x"]
param_values = (
    st.text(max_size=12)
    | st.integers(-(10**30), 10**30).map(str)
    | st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4)  # digits of any script, ²
    | st.integers(1, 6000).map(lambda n: "9" * n)  # more digits than int() converts
    | st.sampled_from(["", "0", "1001", " 1", "1e3", "0x10", "did:plc:fuzzxrpc0000000000000000", "3k00000000001"])
)


@pytest.mark.parametrize(
    "route", range(len(fuzz_xrpc.GET_ROUTES)), ids=lambda i: fuzz_xrpc.GET_ROUTES[i].rsplit(".")[-1]
)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.lists(st.tuples(st.sampled_from(PARAMS), param_values), max_size=5))
def test_xrpc_parameters(xrpc: fuzz_xrpc.XrpcApp, route: int, params: list[tuple[str, str]]) -> None:
    """Any parameters, repeated or not, URL-encoded as a client would send them."""
    xrpc.run(bytes([route]) + urlencode(params).encode())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_xrpc_raw_requests(xrpc: fuzz_xrpc.XrpcApp, data: st.DataObject) -> None:
    """Raw query bytes (not UTF-8, stray %, &, =) and requestCrawl bodies, from the seed requests."""
    xrpc.run(data.draw(mutations(fuzz_xrpc.seeds())))
