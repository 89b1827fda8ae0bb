"""The sequencer's part of a takedown, in process: the announcement, the drops, and recovery of the status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libipld

from actors.accounts import AccountState
from actors.messages import PersistEvent, WriteBehind
from actors.messages_control import SetAccountStatus
from actors.sequencer import Sequencer, recover
from protocol.frames import IdentityEvent, encode_frame
from store.accounts import ACTIVE, TAKENDOWN, AccountRow, load_account, upsert_accounts
from store.db import open_database
from store.eventlog import EventLog
from store.hosts import ensure_host
from store.migrations import apply_migrations

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
OTHER = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


class Broadcasts:
    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []

    def tell(self, message: Any) -> None:
        self.frames.extend(message.events)


def identity_event(did: str, seq: int, host_id: int) -> PersistEvent:
    frame = encode_frame(IdentityEvent(seq=seq, did=did, time="2026-01-01T00:00:00.000Z"), 0)
    return PersistEvent(host_id, seq, "#identity", frame, AccountState(did, host_id), 0.0)


def test_takedown_is_announced_drops_later_events_and_survives_recovery(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
    apply_migrations(db)
    with db.connection_context():
        host_id = ensure_host(db, "pds.example.com").id
        upsert_accounts(db, [AccountRow(d, host_id, ACTIVE, ACTIVE, None, None, None, False) for d in (DID, OTHER)])
    log = EventLog(tmp_path / "events", db, retention_seconds=3600)
    recover(db, log)
    out = Broadcasts()
    seq = Sequencer.start(db, log, out)
    try:
        seq.tell(identity_event(DID, 1, host_id))
        assert seq.ask(SetAccountStatus(DID, TAKENDOWN), timeout=10) == 2
        assert seq.ask(SetAccountStatus("did:plc:unknownunknownunknownunkn", TAKENDOWN), timeout=10) is None
        # stale senders (an ingest worker that verified before the change) are dropped here
        seq.tell(identity_event(DID, 2, host_id))
        seq.tell(identity_event(OTHER, 3, host_id))
        seq.ask(WriteBehind(), timeout=10)
    finally:
        seq.stop()
    header, body = libipld.decode_dag_cbor_multi(out.frames[1][1])
    assert header["t"] == "#account" and body["did"] == DID and body["seq"] == 2
    assert body["active"] is False and body["status"] == "takendown"
    assert [libipld.decode_dag_cbor_multi(f)[1]["did"] for _, f in out.frames] == [DID, DID, OTHER]
    with db.connection_context():
        row = load_account(db, DID)
        assert row is not None and row.status == TAKENDOWN and row.upstream_status == ACTIVE

    # a crash before write-behind: recovery re-applies the relay's own #account as a relay status
    with db.connection_context():
        upsert_accounts(db, [AccountRow(DID, host_id, ACTIVE, ACTIVE, None, None, None, False)])
        db.execute_sql("UPDATE relay_state SET value = '1' WHERE key = 'sequencer_checkpoint_seq'")
    log2 = EventLog(tmp_path / "events", db, retention_seconds=3600)
    recover(db, log2)
    with db.connection_context():
        row = load_account(db, DID)
        assert row is not None and row.status == TAKENDOWN and row.upstream_status == ACTIVE
    log2.close()

    # a new sequencer reads the takedowns from SQL; a reversal announces the account active
    out2 = Broadcasts()
    log3 = EventLog(tmp_path / "events", db, retention_seconds=3600)
    recover(db, log3)
    seq2 = Sequencer.start(db, log3, out2)
    try:
        seq2.tell(identity_event(DID, 4, host_id))
        assert seq2.ask(SetAccountStatus(DID, ACTIVE), timeout=10) == 4
        seq2.tell(identity_event(DID, 5, host_id))
        seq2.ask(WriteBehind(), timeout=10)
    finally:
        seq2.stop()
    frames = [libipld.decode_dag_cbor_multi(f) for _, f in out2.frames]
    assert [(h["t"], b["seq"]) for h, b in frames] == [("#account", 4), ("#identity", 5)]
    assert frames[0][1]["active"] is True and frames[0][1]["did"] == DID


def test_an_unknown_message_is_logged_and_counted(tmp_path: Path, caplog: Any) -> None:
    from prometheus_client import REGISTRY

    db = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
    apply_migrations(db)
    log = EventLog(tmp_path / "events", db, retention_seconds=3600)
    recover(db, log)
    seq = Sequencer.start(db, log, Broadcasts())

    def count() -> float:
        return REGISTRY.get_sample_value("skyrelay_actor_unknown_messages_total", {"actor": "sequencer"}) or 0.0

    before = count()
    try:
        with caplog.at_level("WARNING"):
            seq.ask("not a message", timeout=10)
    finally:
        seq.stop()
    assert count() == before + 1
    assert "unknown message actor=sequencer message=not a message" in caplog.text
