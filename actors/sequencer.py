"""The sequencer: gives accepted events the relay's seq, makes them durable, then broadcasts.

It is the only writer of the output log. Batches form naturally: the first ``PersistEvent``
of a batch queues a ``FlushBatch`` behind whatever is already in the inbox. Each batch is
appended and fsynced before it is told to the broadcaster. Account state and upstream
cursors are written behind to SQL on ``Tick``; the log is the truth, so after a crash
``recover()`` re-applies the log tail past the last SQL checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import libipld
import peewee
import pykka

from actors import tracing
from actors.accounts import AccountState
from actors.blocking import off_loop
from actors.messages import AdvanceCursor, FlushBatch, PersistEvent, Tick, WriteBehind
from actors.messages_broadcast import Broadcast
from actors.messages_mirror import MirrorBatch, MirrorEvent
from actors.metrics import EVENTS_ACCEPTED, INGEST_TO_DURABLE, LAST_SEQ, SEQUENCED_BATCH
from protocol.car import read_car
from protocol.commit import decode_commit
from protocol.errors import ProtocolError
from protocol.frames import AccountEvent, CommitEvent, SyncEvent, decode_frame, resequence
from store.accounts import ACTIVE, load_account, upsert_accounts
from store.eventlog import EventLog, LogRecord
from store.hosts import get_state, reset_cursors, save_cursors, set_state

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "sequencer_checkpoint_seq"
MIRROR_MAX_BACKLOG = 1000  # MirrorBatch messages waiting for the repo mirror


class Sequencer(pykka.ThreadingActor):
    def __init__(
        self,
        db: peewee.Database,
        event_log: EventLog,
        broadcaster: Any,
        *,
        prune_interval_seconds: float = 60.0,
        batch_window_seconds: float = 0.0,
        mirror: Any = None,
    ) -> None:
        super().__init__()
        self.mirror = mirror  # told each durable batch's repo events (None: no repo mirror)
        self.prune_interval_seconds = prune_interval_seconds
        self.batch_window_seconds = batch_window_seconds
        self._writer: gevent.Greenlet | None = None  # the write-behind in flight, if any
        self._last_prune = time.monotonic()
        self.db = db
        self.log = event_log
        self.broadcaster = broadcaster
        self._pending: list[PersistEvent] = []
        self._flush_queued = False
        self._accounts: dict[str, AccountState] = {}
        self._cursors: dict[int, int] = {}
        self._written_cursors: dict[int, int] = {}
        self._cursor_resets: set[int] = set()  # hosts whose saved cursor must be allowed to go down
        self._last_seq = event_log.last_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, PersistEvent):
            self._pending.append(message)
            if not self._flush_queued:
                self._flush_queued = True
                if self.batch_window_seconds > 0:  # gather a little more: fewer fsyncs and sends
                    gevent.spawn_later(self.batch_window_seconds, self.actor_ref.tell, FlushBatch())
                else:
                    self.actor_ref.tell(FlushBatch())
        elif isinstance(message, FlushBatch):
            self._flush_queued = False
            self._flush()
        elif isinstance(message, AdvanceCursor):
            if message.reset:
                self._cursors[message.host_id] = message.upstream_seq
                self._cursor_resets.add(message.host_id)
            elif message.upstream_seq > self._cursors.get(message.host_id, -1):
                self._cursors[message.host_id] = message.upstream_seq
        elif isinstance(message, WriteBehind):
            self._flush()
            self._write_behind(wait=True)
        elif isinstance(message, Tick):
            self._flush()
            self._write_behind(wait=False)
            if time.monotonic() - self._last_prune >= self.prune_interval_seconds:
                self._last_prune = time.monotonic()
                removed = off_loop(self.log.prune)
                if removed:
                    log.info("event log pruned records=%d first_seq=%d", removed, self.log.first_seq)
        return None

    def on_stop(self) -> None:
        self._flush()
        self._write_behind(wait=True)
        self.log.close()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        now = time.time()
        records = []
        out = []
        seq = self._last_seq
        for item in batch:
            seq += 1
            frame = resequence(item.frame, seq)
            records.append(LogRecord(seq, now, item.host_id, item.upstream_seq, frame))
            out.append((seq, frame))
        self.log.append(records)
        off_loop(self.log.sync)
        if tracing.ENABLED:
            tracing.events_durable(batch, self._last_seq + 1, now)
        self._last_seq = seq
        # an account status change is written through before it is announced, so the read API
        # (which checks SQL) never serves a repo the firehose has already said is taken down
        changes = [item.account for item in batch if item.kind == "#account" and item.account is not None]
        if changes:
            off_loop(lambda: self._write_accounts(changes))
        self.broadcaster.tell(Broadcast(tuple(out)))
        done = time.time()
        kinds: dict[str, int] = {}
        for item in batch:
            if item.account is not None:
                self._accounts[item.account.did] = item.account
            if item.upstream_seq > self._cursors.get(item.host_id, -1):
                self._cursors[item.host_id] = item.upstream_seq
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
            INGEST_TO_DURABLE.observe(done - item.received_at)
        for kind, count in kinds.items():
            EVENTS_ACCEPTED.labels(kind).inc(count)
        if self.mirror is not None:
            mirrored = tuple(e for e in (mirror_event(item) for item in batch) if e is not None)
            if mirrored:
                # the mirror's inbox is bounded by waiting here: our own inbox then fills up and
                # the subscribers stop reading their hosts (the firehose slows to the disk's pace)
                while self.mirror.backlog() > MIRROR_MAX_BACKLOG:
                    gevent.sleep(0.005)
                self.mirror.tell(MirrorBatch(mirrored))
        SEQUENCED_BATCH.observe(len(batch))
        LAST_SEQ.set(seq)

    def _write_accounts(self, accounts: list[AccountState]) -> None:
        with self.db.connection_context(), self.db.atomic():
            upsert_accounts(self.db, (a.to_row() for a in accounts))

    def _write_behind(self, *, wait: bool) -> None:
        """Write account state and cursors of durable events to SQL, in the background.

        One write at a time; while one runs, changes accumulate for the next. With ``wait``
        the call returns only once everything durable so far is in SQL.
        """
        if self._writer is not None:
            if not wait:
                return
            self._writer.join()
        if not self._accounts and not self._cursor_resets and self._cursors == self._written_cursors:
            return
        accounts, self._accounts = self._accounts, {}
        cursors = dict(self._cursors)
        resets, self._cursor_resets = self._cursor_resets, set()
        checkpoint = self._last_seq

        def write() -> None:
            with self.db.connection_context(), self.db.atomic():
                upsert_accounts(self.db, (a.to_row() for a in accounts.values()))
                reset_cursors(self.db, resets)
                save_cursors(self.db, cursors.items())
                set_state(self.db, CHECKPOINT_KEY, str(checkpoint))

        def run() -> None:
            try:
                off_loop(write)
                self._written_cursors = cursors
            except peewee.DatabaseError as exc:  # keep the changes for the next attempt
                log.warning("write-behind failed error=%s: retrying at the next tick", exc)
                self._cursor_resets |= resets
                for did, state in accounts.items():
                    self._accounts.setdefault(did, state)
            finally:
                self._writer = None

        self._writer = gevent.spawn(run)
        if wait:
            self._writer.join()


def mirror_event(item: PersistEvent) -> MirrorEvent | None:
    """What the repo mirror needs of a durable event (None for events it ignores)."""
    account = item.account
    if item.kind == "#commit":
        body = libipld.decode_dag_cbor_multi(item.frame)[1]
        return MirrorEvent(
            did=body["repo"],
            kind="#commit",
            rev=body["rev"],
            since=body.get("since"),
            commit_cid=body["commit"],
            data_cid=account.data_cid if account else None,
            car=body["blocks"],
        )
    if item.kind == "#sync" and account is not None:
        return MirrorEvent(did=account.did, kind="#sync", rev=account.rev, commit_cid=account.commit_cid)
    if item.kind == "#account" and account is not None and account.upstream_status == "deleted":
        return MirrorEvent(did=account.did, kind="#account", deleted=True)
    return None


def recover(db: peewee.Database, event_log: EventLog) -> int:
    """Open the log and bring SQL up to it: account state and host cursors of the log tail.

    Returns the last durable seq. Called once at start-up, before any actor runs.
    """
    with db.connection_context():
        checkpoint = int(get_state(db, CHECKPOINT_KEY) or 0)
    info = event_log.open(checkpoint)
    if info.truncated_bytes:
        log.warning("event log torn tail removed bytes=%d", info.truncated_bytes)
    states: dict[str, AccountState] = {}
    with db.connection_context():
        for record in info.tail:
            _reapply(db, record, states)
        with db.atomic():
            upsert_accounts(db, (s.to_row() for s in states.values()))
            save_cursors(db, info.host_cursors.items())
            set_state(db, CHECKPOINT_KEY, str(info.last_seq))
    if info.tail:
        log.info("recovered log tail events=%d last_seq=%d", len(info.tail), info.last_seq)
    return info.last_seq


def _reapply(db: peewee.Database, record: LogRecord, states: dict[str, AccountState]) -> None:
    try:
        event = decode_frame(record.frame)
    except ProtocolError:  # our own frames; a failure here is corruption the crc missed
        log.error("undecodable frame in log seq=%d", record.seq)
        return
    did = getattr(event, "repo", None) or getattr(event, "did", None)
    if not isinstance(did, str):
        return
    state = states.get(did)
    if state is None:
        row = load_account(db, did)
        state = AccountState.from_row(row) if row else AccountState(did=did, host_id=record.host_id or None)
    if isinstance(event, CommitEvent | SyncEvent):
        try:
            car = read_car(event.blocks)
            root = car.roots[0]
            commit = decode_commit(car.blocks[root])
        except (ProtocolError, IndexError, KeyError):
            return
        state = state.updated(rev=event.rev, commit_cid=root, data_cid=commit.data)
    elif isinstance(event, AccountEvent):
        state = state.updated(upstream_status=ACTIVE if event.active else (event.status or "deactivated"))
    states[did] = state
