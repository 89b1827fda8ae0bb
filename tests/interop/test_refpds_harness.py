"""The reference network harness: a new account and its record show up on the PDS's own firehose."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
import websocket

from protocol.frames import CommitEvent, decode_frame, split_frame
from tests.interop.refpds import ReferenceNetwork, post

FIREHOSE_TIMEOUT_S = 15.0


def _read_frames_of(url: str, did: str, record_path: str) -> list[tuple[str, dict[str, Any], bytes]]:
    """(type, body, raw frame) of ``did``'s frames, up to the commit that writes ``record_path``."""
    seen: list[tuple[str, dict[str, Any], bytes]] = []
    deadline = time.monotonic() + FIREHOSE_TIMEOUT_S
    ws = websocket.create_connection(url, timeout=FIREHOSE_TIMEOUT_S)
    try:
        while time.monotonic() < deadline:
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            assert isinstance(raw, bytes), "firehose frames are binary"
            header, body = split_frame(raw)
            if did not in (body.get("did"), body.get("repo")):
                continue
            seen.append((header["t"], body, raw))
            if header["t"] == "#commit" and any(op["path"] == record_path for op in body["ops"]):
                return seen
    finally:
        ws.close()
    pytest.fail(f"no commit of {record_path} within {FIREHOSE_TIMEOUT_S} s; saw {[t for t, _, _ in seen]}")


@pytest.mark.interop
def test_account_and_record_appear_on_the_pds_firehose(reference_network: ReferenceNetwork) -> None:
    net = reference_network
    pds_url = net.pds_urls[0]
    handle = f"h{secrets.token_hex(4)}.test"
    did, access_jwt = net.create_account(pds_url, handle)
    assert did.startswith("did:plc:") and access_jwt
    written = net.create_record(did, "app.bsky.feed.post", post("hello from the harness"))
    rkey = written["uri"].rsplit("/", 1)[1]

    frames = _read_frames_of(net.firehose_url(pds_url, cursor=0), did, f"app.bsky.feed.post/{rkey}")

    types = [t for t, _, _ in frames]
    assert types[:3] == ["#identity", "#account", "#commit"], types
    identity, account, created = (body for _, body, _ in frames[:3])
    assert identity["handle"] == handle
    assert account["active"] is True
    assert created["ops"] == [] and created["since"] is None
    seqs = [body["seq"] for _, body, _ in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    last = decode_frame(frames[-1][2])
    assert isinstance(last, CommitEvent)
    assert last.rev == written["commit"]["rev"]
    assert [op.action for op in last.ops] == ["create"]
    # The account's DID document on the local PLC names this PDS and the handle.
    doc = net.did_doc(did)
    assert doc["alsoKnownAs"] == [f"at://{handle}"]
    assert doc["service"][0]["serviceEndpoint"] == pds_url
