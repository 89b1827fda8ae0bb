"""What the repo mirror missed: durable events read back from the event log after its checkpoint.

The mirror writes slices in time-batched flushes and records, in the same transaction, the
relay seq it has applied up to (``CarStore.mirror_seq``). Events told to it and not yet
flushed when the process died (or while the mirror actor was down) are still in the event
log: at start the mirror reads them back from there, in order, before any live batch.
"""

from __future__ import annotations

from collections.abc import Iterator

from actors.messages_mirror import MirrorEvent
from protocol.car import read_car
from protocol.commit import decode_commit
from protocol.errors import ProtocolError
from protocol.frames import AccountEvent, CommitEvent, SyncEvent, decode_frame
from store.eventlog import EventLog

READ_CHUNK = 1000


def mirror_event_of_frame(seq: int, frame: bytes) -> MirrorEvent | None:
    """The mirror's view of one logged frame (None for events it ignores or cannot read)."""
    try:
        event = decode_frame(frame)
    except ProtocolError:  # our own log: corruption its checksums missed; the gap heals by backfill
        return None
    if isinstance(event, CommitEvent | SyncEvent):
        try:
            car = read_car(event.blocks)
            root = car.roots[0]
            commit = decode_commit(car.blocks[root])
        except (ProtocolError, IndexError, KeyError):
            return None
        if isinstance(event, SyncEvent):
            return MirrorEvent(did=event.did, kind="#sync", rev=event.rev, commit_cid=root, seq=seq)
        return MirrorEvent(did=event.repo, kind="#commit", rev=event.rev, since=event.since, commit_cid=root,
                           data_cid=commit.data, car=event.blocks, seq=seq)  # fmt: skip
    if isinstance(event, AccountEvent) and not event.active and event.status == "deleted":
        return MirrorEvent(did=event.did, kind="#account", deleted=True, seq=seq)
    return None


def missed_events(event_log: EventLog, after: int, upto: int) -> Iterator[list[MirrorEvent]]:
    """The mirror events of log records ``after < seq <= upto``, in chunks, in order."""
    cursor = after
    while cursor < upto:
        records = event_log.read_after(cursor, READ_CHUNK)
        if not records:
            return
        chunk = []
        for seq, frame in records:
            if seq > upto:
                break
            event = mirror_event_of_frame(seq, frame)
            if event is not None:
                chunk.append(event)
        yield chunk
        cursor = records[-1][0]
