"""actors.lookahead: which DIDs are looked up ahead, and the bounds on it."""

from __future__ import annotations

import gevent
import gevent.event

from actors.lookahead import LookAhead
from protocol.frames import AccountEvent, encode_frame, peek_did


class Identities:
    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.gate = gevent.event.Event()
        self.resolved: list[str] = []

    def peek(self, did: str) -> object | None:
        return object() if did in self.known else None

    def resolve(self, did: str) -> object:
        self.gate.wait(5)
        self.resolved.append(did)
        if did.endswith("bad"):
            raise ValueError("no such DID")
        self.known.add(did)
        return object()


class Accounts:
    def __init__(self) -> None:
        self.items: set[str] = set()

    def cached(self, did: str) -> bool:
        return did in self.items

    def get(self, did: str) -> None:
        self.items.add(did)


def test_peek_did_reads_repo_or_did_and_never_raises() -> None:
    frame = encode_frame(AccountEvent(seq=3, did="did:plc:abc", time="2024-01-01T00:00:00Z", active=True, status=None))
    assert peek_did(frame) == "did:plc:abc"
    assert peek_did(b"\xff\x00garbage") is None
    assert peek_did(b"") is None


def test_only_missing_dids_are_looked_up_once_each_and_in_flight_is_bounded() -> None:
    identities, accounts = Identities({"did:plc:known"}), Accounts()
    accounts.items.add("did:plc:known")
    ahead = LookAhead(identities, accounts, max_in_flight=2)
    for did in ("did:plc:known", "did:plc:a", "did:plc:a", "did:plc:b", "did:plc:c"):
        ahead.offer(did)
    assert ahead.in_flight == 2  # known: nothing to do; a twice: once; c: skipped (the subscriber looks it up itself)
    identities.gate.set()
    gevent.sleep(0.01)
    assert sorted(identities.resolved) == ["did:plc:a", "did:plc:b"]
    assert ahead.in_flight == 0 and not ahead.missing("did:plc:a") and ahead.missing("did:plc:c")


def test_a_failed_identity_still_ends_the_look_up() -> None:
    identities, accounts = Identities(set()), Accounts()
    identities.gate.set()
    ahead = LookAhead(identities, accounts)
    ahead.offer("did:plc:bad")
    gevent.sleep(0.01)
    assert ahead.in_flight == 0 and ahead.missing("did:plc:bad")


def test_room_is_bounded_per_host_and_for_the_process() -> None:
    ahead = LookAhead(Identities(set()), Accounts(), max_bytes=1000, frames_per_host=3, bytes_per_host=500)
    assert ahead.room(host_bytes=0, host_frames=0)
    assert not ahead.room(host_bytes=0, host_frames=3)
    assert not ahead.room(host_bytes=500, host_frames=1)
    ahead.hold(1000)
    assert not ahead.room(host_bytes=0, host_frames=0)
    ahead.release(1000)
    assert ahead.room(host_bytes=0, host_frames=0)
