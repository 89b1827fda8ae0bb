"""The fan-out upstream subscriber in process: what it stores, drops, redials for, or records as a hole.

The actor is built but not started (no connection): frames go straight to its handler, and its
writer step appends to a real event log on SQLite and tells a fake broadcaster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libipld
import pytest
from prometheus_client import REGISTRY

from actors.fanout_status import UpstreamStatus
from actors.fanout_upstream import BATCH_FRAMES, FanoutConfig, FanoutUpstream, _Reconnect
from actors.messages_broadcast import Broadcast
from protocol.frames import IdentityEvent, encode_frame, error_frame, info_frame
from store.db import open_database
from store.eventlog import EventLog
from store.migrations import apply_migrations

DID = "did:plc:fanoutunit0000000000000"


class FakeBroadcaster:
    def __init__(self) -> None:
        self.told: list[Any] = []

    def tell(self, message: Any) -> None:
        self.told.append(message)


def event(seq: int) -> bytes:
    return encode_frame(IdentityEvent(seq=seq, did=DID, time="2026-01-01T00:00:00Z"))


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    db = open_database(f"sqlite:///{tmp_path / 'node.sqlite'}")
    apply_migrations(db)
    event_log = EventLog(tmp_path / "events", db)
    event_log.open()
    yield event_log
    event_log.close()


def node(log: EventLog) -> tuple[FanoutUpstream, FakeBroadcaster]:
    broadcaster = FakeBroadcaster()
    config = FanoutConfig(upstream="ws://127.0.0.1:9", max_frame_bytes=1 << 20, idle_timeout_seconds=5, poll_seconds=5)
    return FanoutUpstream(log, broadcaster, config, UpstreamStatus()), broadcaster


def flush(actor: FanoutUpstream) -> None:
    actor._write(actor._take(BATCH_FRAMES))


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("skyrelay_fanout_frames_dropped_total", {"reason": reason}) or 0.0


def test_frames_are_stored_byte_for_byte_under_the_upstream_seq_then_broadcast(log: EventLog) -> None:
    actor, broadcaster = node(log)
    frames = [event(5), event(7), event(8)]
    for frame in frames:
        actor._handle(frame)
    flush(actor)
    assert log.read_after(0) == [(5, frames[0]), (7, frames[1]), (8, frames[2])]
    assert broadcaster.told == [Broadcast(((5, frames[0]), (7, frames[1]), (8, frames[2])))]
    assert actor.status.last_seq == 8


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xa2\x01\x02garbage", "bad_cbor"),
        (libipld.encode_dag_cbor({"op": 1, "t": "#identity"}) + libipld.encode_dag_cbor({"seq": "7"}), "bad_seq"),
        (libipld.encode_dag_cbor({"op": 1, "t": "#identity"}) + libipld.encode_dag_cbor({"seq": 0}), "bad_seq"),
        (libipld.encode_dag_cbor({"op": 2}) + libipld.encode_dag_cbor({"seq": 9}), "bad_header"),
    ],
)
def test_garbage_is_dropped_and_counted_and_reading_goes_on(log: EventLog, frame: bytes, reason: str) -> None:
    actor, _ = node(log)
    before = dropped(reason)
    actor._handle(frame)
    actor._handle(event(3))
    flush(actor)
    assert dropped(reason) == before + 1
    assert [seq for seq, _ in log.read_after(0)] == [3]


def test_a_seq_that_does_not_increase_is_dropped_and_the_connection_redialled(log: EventLog) -> None:
    actor, _ = node(log)
    actor._handle(event(4))
    before = dropped("seq_not_increasing")
    with pytest.raises(_Reconnect):
        actor._handle(event(4))
    assert dropped("seq_not_increasing") == before + 1
    flush(actor)
    assert [seq for seq, _ in log.read_after(0)] == [4]


def test_an_error_frame_ends_the_connection(log: EventLog) -> None:
    actor, _ = node(log)
    with pytest.raises(_Reconnect, match="FutureCursor"):
        actor._handle(error_frame("FutureCursor", "ahead"))


def test_outdated_cursor_records_the_hole_as_an_info_frame_in_the_log(log: EventLog) -> None:
    actor, _ = node(log)
    actor._handle(event(1))
    actor._handle(event(2))
    actor._handle(info_frame("OutdatedCursor", "pruned"))
    actor._handle(event(10))
    actor._handle(event(11))
    flush(actor)
    records = log.read_after(0)
    assert [seq for seq, _ in records] == [1, 2, 9, 10, 11]
    header, body = libipld.decode_dag_cbor_multi(records[2][1])
    assert header == {"op": 1, "t": "#info"} and body["name"] == "OutdatedCursor"
    assert "events 3 to 9" in body["message"]
    # a cursor inside the hole is told first
    assert [seq for seq, _ in log.read_after(5)] == [9, 10, 11]


def test_an_empty_node_told_outdated_records_no_hole(log: EventLog) -> None:
    actor, _ = node(log)
    actor._handle(info_frame("OutdatedCursor", "pruned"))
    actor._handle(event(500))
    flush(actor)
    assert [seq for seq, _ in log.read_after(0)] == [500]
