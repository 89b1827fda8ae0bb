"""The spider fed by the sequencer's durable batches, with no repo mirror: #identity and #sync events meet DIDs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import libipld

from actors.messages import PersistEvent, WriteBehind
from actors.sequencer import Sequencer, recover
from actors.spider import Spider, SpiderConfig
from protocol.car import write_car
from protocol.cid import cid_for_dag_cbor
from protocol.frames import IdentityEvent, SyncEvent, encode_frame
from store.db import open_database
from store.eventlog import EventLog
from store.hosts import ensure_host
from store.migrations import apply_migrations

MET = "did:plc:" + "m" * 24  # only ever met in an #identity event
WRITER = "did:plc:" + "w" * 24  # a #sync's author; its record names FAR
FAR = "did:plc:" + "f" * 24
TIME = "2026-01-01T00:00:00.000Z"


@dataclass
class Ident:
    pds_endpoint: str | None


class Directory:
    def __init__(self, docs: dict[str, str]) -> None:
        self.docs = docs
        self.lookups: list[str] = []

    def resolve(self, did: str) -> Ident:
        self.lookups.append(did)
        if did not in self.docs:
            raise LookupError(did)
        return Ident(self.docs[did])


class Broadcasts:
    def tell(self, message: Any) -> None:
        pass


def test_firehose_only_relay_spiders_identity_and_sync_events(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
    apply_migrations(db)
    with db.connection_context():
        host_id = ensure_host(db, "pds.example.com").id
    directory = Directory({MET: "https://met.example.com", FAR: "https://far.example.com"})
    subscribed: list[str] = []
    spider = Spider(db, directory, lambda h: None, subscribed.append, SpiderConfig(lookups_per_second=1000)).start()
    log = EventLog(tmp_path / "events", db, retention_seconds=3600)
    recover(db, log)
    seq = Sequencer.start(db, log, Broadcasts(), discovered=spider.offer_durable)  # no mirror at all
    record = libipld.encode_dag_cbor({"$type": "app.bsky.graph.follow", "subject": FAR, "createdAt": TIME})
    car = write_car([cid_for_dag_cbor(record)], [(cid_for_dag_cbor(record), record)])
    identity = encode_frame(IdentityEvent(seq=1, did=MET, time=TIME), 0)
    sync = encode_frame(SyncEvent(seq=2, did=WRITER, blocks=car, rev="3l2aaaaaaaaaa", time=TIME), 0)
    try:
        seq.tell(PersistEvent(host_id, 1, "#identity", identity, None, 0.0))  # an account not stored
        seq.tell(PersistEvent(host_id, 2, "#sync", sync, None, 0.0))
        seq.ask(WriteBehind(), timeout=10)
        deadline = time.monotonic() + 10
        while len(subscribed) < 2 and time.monotonic() < deadline:
            gevent.sleep(0.01)
    finally:
        seq.stop()
        spider.stop()
    assert sorted(subscribed) == ["far.example.com", "met.example.com"]
    assert MET in directory.lookups and FAR in directory.lookups
