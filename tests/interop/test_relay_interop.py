"""Interop: two reference PDSes (npm) -> the relay (subprocess) -> the Python ``atproto`` SDK's firehose client.

Four accounts on two PDSes write, update and delete records and go through every lifecycle
action (handle change, deactivate/activate, takedown/reversal, deletion). The PDS firehoses,
read live from cursor 0 with websocket-client, say what happened upstream. The relay must
deliver every one of those events, unchanged except for its own seq: contiguous relay seqs,
each host's (so each account's) upstream order, every commit signed by the key in the PLC
DID document; a replay from cursor 0 repeats the sequence; nothing is dropped.

Two behaviours of the reference PDS shape the test:

- It publishes by polling its own event table, backing off to one poll a second when idle, so an
  event reaches live subscribers up to ~1 s after the XRPC call that made it. Deleting an account
  purges the account's earlier rows from that table; if the deletion comes before the poll, those
  events are never published to anyone. So the test waits for the account's last commit to reach
  the relay before deleting it, and checks that the PDS's own replay has lost what the relay kept.
- A deactivated or taken-down account cannot write (401), so no upstream commit exists that the
  relay should drop as ``account_inactive``: an honest run drops nothing.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libipld
import pytest
import websocket
from atproto import CAR, FirehoseSubscribeReposClient, models, parse_subscribe_repos_message

from protocol.car import read_car
from protocol.commit import decode_commit
from protocol.crypto import load_did_key
from protocol.diddoc import parse_did_document
from tests.interop.refpds import ReferenceNetwork, XrpcError, post
from tests.support.consumer import collect
from tests.support.procs import RelayProcess, wait_until

EVENT_WAIT_S = 20.0  # an event reaches a live subscriber within ~1 s here; generous for slow CI
SOCKET_POLL_S = 0.2  # how often reader threads look at their stop flag
PROFILE = "app.bsky.actor.profile"
POST = "app.bsky.feed.post"

Event = tuple[str, dict[str, Any]]  # (frame type, decoded body)

# What each account's PDS emits for the script in the test, in order. Account creation is
# #identity, #account, an empty #commit, #sync; activation is #account, #identity, #sync.
CREATED = ["#identity", "#account", "#commit", "#sync"]
EXPECTED_TYPES = {
    "alice": [*CREATED, "#commit", "#commit", "#commit", "#commit", "#identity", "#commit"],
    "bob": [*CREATED, "#commit", "#account", "#account", "#identity", "#sync", "#commit", "#commit"],
    "carol": [*CREATED, "#commit", "#account", "#account", "#commit"],
    "dave": [*CREATED, "#commit", "#commit", "#account"],
}


def did_of(body: dict[str, Any]) -> str | None:
    did = body.get("repo") or body.get("did")
    return did if isinstance(did, str) else None


def without_seq(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "seq"}


def has_commit(events: list[Event], did: str, rev: str) -> bool:
    return any(t == "#commit" and b.get("repo") == did and b.get("rev") == rev for t, b in events)


class UpstreamReader:
    """A PDS's own firehose from cursor 0, read with websocket-client in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ws = websocket.create_connection(url, timeout=SOCKET_POLL_S)
        self._thread = threading.Thread(target=self._run, name=f"upstream {url}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                return
            assert isinstance(raw, bytes), "firehose frames are binary"
            header, body = libipld.decode_dag_cbor_multi(raw)
            with self._lock:
                self._events.append((header["t"], body))

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ws.close()


class SdkConsumer:
    """The relay's firehose through the ``atproto`` SDK's ``FirehoseSubscribeReposClient``, in a thread.

    The SDK skips frames it cannot decode without a word, so what arrives is counted by the
    caller; every message is also parsed into the SDK's model, and parse failures are kept.
    The cursor stays 0: if the SDK reconnected it would replay, and the seq check would see it.
    """

    def __init__(self, port: int) -> None:
        self._client = FirehoseSubscribeReposClient({"cursor": 0}, base_uri=f"ws://127.0.0.1:{port}/xrpc")
        self._events: list[Event] = []
        self.models: list[Any] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sdk firehose", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._client.start(self._on_message, self.errors.append)

    def _on_message(self, message: Any) -> None:
        event = (str(message.type), dict(message.body))  # copied before the SDK's parser sees it
        with self._lock:
            self._events.append(event)
        self.models.append(parse_subscribe_repos_message(message))

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def close(self) -> None:
        self._client.stop()
        self._thread.join(timeout=10)


def read_replay_until(url: str, done: Callable[[list[Event]], bool]) -> list[Event]:
    """A fresh read of a firehose from ``url`` until ``done(events so far)`` holds."""
    reader = UpstreamReader(url)
    try:
        wait_until(lambda: done(reader.events()), EVENT_WAIT_S, f"replay of {url}")
        return reader.events()
    finally:
        reader.close()


@pytest.fixture
def relay(tmp_path: Path, db_url: str, reference_network: ReferenceNetwork) -> Iterator[RelayProcess]:
    """A fresh relay on ``db_url`` that resolves identities at the reference network's PLC."""
    process = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=reference_network.plc_url).start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


@pytest.mark.interop
def test_relay_delivers_every_reference_pds_event_to_the_sdk(
    reference_network: ReferenceNetwork, relay: RelayProcess
) -> None:
    net = reference_network
    pds0, pds1 = net.pds_urls
    # The DID documents name http://localhost:PORT; the PDS's own requestCrawl omits the port.
    for url in (pds0, pds1):
        assert relay.request_crawl(urlsplit(url).netloc) == {}
    # A new host is read live, from now on: accounts come after the relay is subscribed.
    wait_until(lambda: relay.metric("skyrelay_upstream_hosts_connected") >= 2, EVENT_WAIT_S, "relay to subscribe")
    upstream = {url: UpstreamReader(net.firehose_url(url, cursor=0)) for url in (pds0, pds1)}
    sdk = SdkConsumer(relay.port)
    try:
        tag = secrets.token_hex(3)
        home: dict[str, str] = {}  # did -> its PDS
        names: dict[str, str] = {}  # did -> role in EXPECTED_TYPES
        keys: dict[str, str] = {}  # did -> did:key from the PLC DID document

        def account(name: str, pds_url: str) -> str:
            did, _ = net.create_account(pds_url, f"{name}{tag}.test")
            home[did], names[did] = pds_url, name
            signing_key = parse_did_document(net.did_doc(did), did).signing_key
            assert signing_key is not None
            keys[did] = signing_key
            return did

        def seen_by_relay_and_upstream(did: str, rev: str) -> None:
            wait_until(lambda: has_commit(upstream[home[did]].events(), did, rev), EVENT_WAIT_S, f"upstream {rev}")
            wait_until(lambda: has_commit(sdk.events(), did, rev), EVENT_WAIT_S, f"relay {rev}")

        alice, bob = account("alice", pds0), account("bob", pds1)
        carol, dave = account("carol", pds0), account("dave", pds1)

        # alice: create, putRecord (create, then update), delete, handle change
        first = net.create_record(alice, POST, post("first"))["uri"].rsplit("/", 1)[1]
        net.put_record(alice, PROFILE, "self", {"$type": PROFILE, "displayName": "Alice"})
        net.put_record(alice, PROFILE, "self", {"$type": PROFILE, "displayName": "Alice B."})
        net.delete_record(alice, POST, first)
        net.update_handle(alice, f"alice2{tag}.test")
        # bob: deactivate (writes refused meanwhile), activate, write again
        net.create_record(bob, POST, post("before"))
        net.deactivate(bob)
        with pytest.raises(XrpcError, match="AccountDeactivated"):
            net.create_record(bob, POST, post("while deactivated"))
        net.activate(bob)
        net.create_record(bob, POST, post("after"))
        # carol: takedown (writes refused meanwhile) and its reversal
        net.create_record(carol, POST, post("before"))
        net.takedown(carol, True)
        with pytest.raises(XrpcError, match="AccountTakedown"):
            net.create_record(carol, POST, post("while taken down"))
        net.takedown(carol, False)
        net.create_record(carol, POST, post("after"))
        # dave: writes, then deletion, once his writes are out (the PDS purges unpublished ones)
        net.create_record(dave, POST, post("soon gone"))
        last = net.put_record(dave, PROFILE, "self", {"$type": PROFILE, "displayName": "Dave"})["commit"]["rev"]
        seen_by_relay_and_upstream(dave, last)
        net.delete_account(dave, pds_url=pds1)
        # one last commit per PDS: once it is through, every earlier event of that PDS is too
        markers = {
            alice: net.create_record(alice, POST, post("end"))["commit"]["rev"],
            bob: net.create_record(bob, POST, post("end"))["commit"]["rev"],
        }
        for did, rev in markers.items():
            seen_by_relay_and_upstream(did, rev)
    finally:
        sdk.close()
        for reader in upstream.values():
            reader.close()

    got = sdk.events()
    assert not sdk.errors, sdk.errors
    # The SDK decoded and parsed every frame the relay sent (it would skip bad ones silently),
    # into the model of the frame's type; its own CAR reader finds each commit's root block.
    assert len(sdk.models) == len(got)
    for (t, b), model in zip(got, sdk.models, strict=True):
        assert model.py_type == f"com.atproto.sync.subscribeRepos{t}" and model.seq == b["seq"]
        if isinstance(model, models.ComAtprotoSyncSubscribeRepos.Commit):
            assert model.repo == b["repo"] and model.rev == b["rev"]
            assert model.commit in CAR.from_bytes(model.blocks).blocks
    # Relay seqs: strictly increasing and contiguous from 1 on this fresh relay.
    assert [b["seq"] for _, b in got] == list(range(1, len(got) + 1)), relay.log()
    # Only this test's accounts wrote while the relay was subscribed.
    assert {did_of(b) for _, b in got} == set(home), relay.log()

    # Upstream: the script produced what the reference PDS is known to emit.
    for did, name in names.items():
        theirs = [t for t, b in upstream[home[did]].events() if did_of(b) == did]
        assert theirs == EXPECTED_TYPES[name], (name, theirs)
    alice_ops = [
        [op["action"] for op in b["ops"]] for t, b in upstream[pds0].events() if t == "#commit" and did_of(b) == alice
    ]
    assert alice_ops == [[], ["create"], ["create"], ["update"], ["delete"], ["create"]]

    # Every upstream event, in its host's upstream order (so in each account's order), field for
    # field as the PDS sent it apart from seq; interleaving across hosts is the relay's choice.
    for url in (pds0, pds1):
        expected = [(t, without_seq(b)) for t, b in upstream[url].events() if did_of(b) in home]
        delivered = [(t, without_seq(b)) for t, b in got if home.get(did_of(b) or "") == url]
        assert delivered == expected, (url, relay.log())

    # Every #commit and #sync is signed with the key of the PLC DID document.
    signed = 0
    for t, b in got:
        if t not in ("#commit", "#sync"):
            continue
        car = read_car(b["blocks"])
        commit = decode_commit(car.blocks[b["commit"] if t == "#commit" else car.roots[0]])
        assert commit.did == did_of(b) and commit.rev == b["rev"]
        assert commit.verify(load_did_key(keys[commit.did])), (t, commit.did, commit.rev)
        signed += 1
    assert signed == sum(t in ("#commit", "#sync") for name in names.values() for t in EXPECTED_TYPES[name])

    # The PDS forgot dave's history when it deleted him; the relay, which read it live, did not.
    replayed = read_replay_until(net.firehose_url(pds1, cursor=0), lambda ev: has_commit(ev, bob, markers[bob]))
    assert [t for t, b in replayed if did_of(b) == dave] == ["#account"]
    assert [t for t, b in got if did_of(b) == dave] == EXPECTED_TYPES["dave"]

    # A replay from cursor 0 (another client: websocket-client + libipld) is the same sequence.
    again = collect(relay.ws_url, cursor=0, count=len(got), timeout=30)
    assert [(h["t"], b) for h, b in again] == got
    assert collect(relay.ws_url, cursor=len(got), count=1, timeout=1.0) == []

    # An honest run: nothing dropped, nothing let through leniently, no gap.
    assert relay.metric("skyrelay_events_dropped_total") == 0, relay.log()
    assert relay.metric("skyrelay_verify_warnings_total") == 0, relay.log()
    assert relay.metric("skyrelay_accounts_marked_resync_total") == 0, relay.log()
