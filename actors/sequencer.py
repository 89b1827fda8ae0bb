"""The sequencer: gives accepted events the relay's seq, makes them durable, then broadcasts.

It is the only writer of the output log. Batches form naturally: the first ``PersistEvent``
of a batch queues a ``FlushBatch`` behind whatever is already in the inbox. Each batch is
appended and fsynced before it is told to the broadcaster. Account state and upstream
cursors are written behind to SQL on ``Tick``; the log is the truth, so after a crash
``recover()`` re-applies the log tail past the last SQL checkpoint.

Infrastructure failures on the way to durable are retried with backoff (``actors.backoff``)
with the batch held: a failed log write (a full disk) is repaired and the batch written again
with the same seqs; a database error writing an account status change is retried. Meanwhile
the inbox fills and the subscribers stop reading: ingest stops, nothing is lost or logged
twice, and it resumes when the disk or database is back. Only a failure that lasts the retry
policy's limit, or a failed fsync (which only recovery at start-up can judge), stops the actor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from typing import Any

import gevent
import libipld
import peewee
import pykka

from actors import tracing
from actors.account_announce import RELAY_HOST_ID, announcement
from actors.accounts import AccountState
from actors.backoff import RetryPolicy, retry
from actors.blocking import off_loop
from actors.messages import AdvanceCursor, FlushBatch, MovedHint, PersistBatch, PersistEvent, Tick, WriteBehind
from actors.messages_broadcast import Broadcast
from actors.messages_control import SetAccountStatus, unknown_message
from actors.messages_mirror import MirrorBatch, MirrorEvent
from actors.metrics import (
    EVENTS_ACCEPTED,
    EVENTS_DROPPED,
    HOSTS_AT_ACCOUNT_LIMIT,
    INFRA_RETRIES,
    INGEST_TO_DURABLE,
    LAST_SEQ,
    SEQUENCED_BATCH,
    SEQUENCER_DROPPED,
    observe_many,
)
from protocol.car import read_car
from protocol.commit import decode_commit
from protocol.errors import ProtocolError
from protocol.frames import AccountEvent, CommitEvent, SyncEvent, decode_frame, resequenced
from store.accounts import ACTIVE, TAKENDOWN, THROTTLED, load_account, takendown_dids, throttled_dids, upsert_accounts
from store.db import TRANSIENT_DB_ERRORS
from store.eventlog import EventLog, EventLogWriteError, LogRecord
from store.hosts import (
    get_state,
    hosts_at_account_limit,
    list_hosts,
    refresh_account_counts,
    reset_cursors,
    save_cursors,
    set_state,
)
from store.log_recovery import tail_cursors

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "sequencer_checkpoint_seq"
MIRROR_MAX_BACKLOG = 1000  # MirrorBatch messages waiting for the repo mirror
MAX_REMEMBERED_REVS = 500_000  # accounts whose last sequenced rev the sequencer keeps (LRU)
ACCOUNT_COUNT_SECONDS = 5.0  # hosts whose accounts changed get their account_count recounted this often


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
        retry_policy: RetryPolicy | None = None,
        discovered: Any = None,
        default_account_limit: int = 100_000,
        moved: Any = None,
    ) -> None:
        super().__init__()
        self.discovered = discovered  # the spider's non-blocking offer of each durable batch, or None
        self.moved = moved  # the spider's non-blocking offer of a DID dropped as wrong_host, or None
        self.default_account_limit = default_account_limit  # for hosts without their own (at-limit gauge)
        self.retry_policy = retry_policy or RetryPolicy()
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
        self._takendown: set[str] = set()  # accounts whose events are dropped here (admin takedowns)
        self._throttled: set[str] = set()  # accounts past their host's account limit (dropped until released)
        self._revs: OrderedDict[str, str] = OrderedDict()  # did -> rev of its last sequenced commit/sync
        self._count_hosts: set[int] = set()  # hosts with account changes since their last recount
        self._last_count = 0.0

    def on_start(self) -> None:
        self._takendown, self._throttled = off_loop(lambda: self._load_takedowns())

    def _load_takedowns(self) -> tuple[set[str], set[str]]:
        with self.db.connection_context():
            return takendown_dids(self.db), throttled_dids(self.db)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def on_receive(self, message: Any) -> Any:
        match message:
            case PersistEvent():
                self._accept(message)
            case PersistBatch():
                for event in message.events:
                    self._accept(event)
            case FlushBatch():
                self._flush_queued = False
                self._flush()
            case AdvanceCursor():
                if message.reset:
                    self._cursors[message.host_id] = message.upstream_seq
                    self._cursor_resets.add(message.host_id)
                elif message.upstream_seq > self._cursors.get(message.host_id, -1):
                    self._cursors[message.host_id] = message.upstream_seq
            case WriteBehind():
                self._flush()
                self._write_behind(wait=True)
            case Tick():
                self._flush()
                self._write_behind(wait=False)
                if time.monotonic() - self._last_prune >= self.prune_interval_seconds:
                    self._last_prune = time.monotonic()
                    removed = off_loop(self.log.prune)
                    if removed:
                        log.info("event log pruned records=%d first_seq=%d", removed, self.log.first_seq)
            case SetAccountStatus():
                return self._set_status(message.did, message.status)
            case MovedHint():
                if self.moved is not None:
                    self.moved(message.did)
            case _:
                unknown_message("sequencer", message)
        return None

    def _accept(self, message: PersistEvent) -> None:
        account = message.account
        if account is not None and message.host_id != RELAY_HOST_ID:
            if account.did in self._takendown:  # taken down since the sender verified it
                EVENTS_DROPPED.labels("", "account_takendown").inc()
                if message.upstream_seq > self._cursors.get(message.host_id, -1):
                    self._cursors[message.host_id] = message.upstream_seq
                return
            if account.did in self._throttled:  # throttled since the sender verified it
                EVENTS_DROPPED.labels("", "account_throttled").inc()
                if message.upstream_seq > self._cursors.get(message.host_id, -1):
                    self._cursors[message.host_id] = message.upstream_seq
                return
            if account.status in (TAKENDOWN, THROTTLED):  # the sender's cache predates a reversal
                message = dataclasses.replace(message, account=account.updated(status=ACTIVE))
        elif account is not None and message.kind == "#account" and account.status == THROTTLED:
            self._throttled.add(account.did)  # a subscriber throttled a new account
        if not self._rev_in_order(message):
            return
        self._pending.append(message)
        if not self._flush_queued:
            self._flush_queued = True
            if self.batch_window_seconds > 0:  # gather a little more: fewer fsyncs and sends
                gevent.spawn_later(self.batch_window_seconds, self.actor_ref.tell, FlushBatch())
            else:
                self.actor_ref.tell(FlushBatch())

    def _set_status(self, did: str, status: str) -> int | None:
        """Set ``did``'s relay status, announce it as ``#account`` (durable, written through); its seq."""
        self._flush()  # events accepted before the change keep their place before the announcement
        if self._writer is not None:  # an older snapshot of this account must not land after the change
            self._writer.join()
        state = next((p.account for p in reversed(self._pending) if p.account and p.account.did == did), None)
        state = state or self._accounts.get(did)
        if state is None:
            row = off_loop(lambda: self._load_account(did))
            if row is None:
                return None
            state = AccountState.from_row(row)
        state = state.updated(status=status)
        self._takendown.discard(did)
        self._throttled.discard(did)
        if status == TAKENDOWN:
            self._takendown.add(did)
        elif status == THROTTLED:
            self._throttled.add(did)
        self._pending.append(announcement(state))
        self._flush()
        return self._last_seq

    def _load_account(self, did: str) -> Any:
        with self.db.connection_context():
            return load_account(self.db, did)

    def _rev_in_order(self, item: PersistEvent) -> bool:
        """An account's rev goes up across hosts too; False (dropped, counted, cursor moved) if not.

        One host's events are verified in order against the worker's own account state, but an
        account that migrates to a host of another ingest worker is verified there against SQL,
        which trails the log by up to a write-behind. This check against the last rev sequenced
        closes that window: a rollback racing a migration is dropped here.
        """
        account = item.account
        if account is None or account.rev is None or item.kind not in ("#commit", "#sync"):
            return True
        last = self._revs.get(account.did)
        if last is not None and (account.rev < last or (account.rev == last and item.kind == "#commit")):
            SEQUENCER_DROPPED.labels("rev_not_newer").inc()
            log.info("event dropped by the sequencer reason=rev_not_newer host_id=%d seq=%d did=%s rev=%s last_rev=%s",
                     item.host_id, item.upstream_seq, account.did, account.rev, last)  # fmt: skip
            if item.upstream_seq > self._cursors.get(item.host_id, -1):  # processed: written behind after a flush
                self._cursors[item.host_id] = item.upstream_seq
            return False
        self._revs[account.did] = account.rev
        self._revs.move_to_end(account.did)
        if len(self._revs) > MAX_REMEMBERED_REVS:
            self._revs.popitem(last=False)
        return True

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
        mirrored: list[MirrorEvent] = []
        for item in batch:
            seq += 1
            frame, body = resequenced(item.frame, seq)  # the one decode of the frame in this process
            records.append(LogRecord(seq, now, item.host_id, item.upstream_seq, frame))
            out.append((seq, frame))
            if self.mirror is not None:
                event = mirror_event(item, seq, body)
                if event is not None:
                    mirrored.append(event)
        self._append_durably(records)
        if tracing.ENABLED:
            tracing.events_durable(batch, self._last_seq + 1, now)
        self._last_seq = seq
        # an account status change is written through before it is announced, so the read API
        # (which checks SQL) never serves a repo the firehose has already said is taken down;
        # a new account announced active (no commit yet) has nothing to hide and is written
        # behind (a start-up burst of new accounts otherwise costs a transaction per batch)
        changes = [
            item.account
            for item in batch
            if item.kind == "#account" and item.account is not None
            and (not item.account.active or item.account.rev is not None)
        ]  # fmt: skip
        if changes:
            retry(
                lambda: off_loop(lambda: self._write_accounts(changes)),
                operation="account_status_write",
                retry_on=TRANSIENT_DB_ERRORS,
                policy=self.retry_policy,
            )
        self.broadcaster.tell(Broadcast(tuple(out)))
        if self.discovered is not None:
            self.discovered(batch)
        done = time.time()
        kinds: dict[str, int] = {}
        for item in batch:
            if item.account is not None:
                self._accounts[item.account.did] = item.account
            if item.upstream_seq > self._cursors.get(item.host_id, -1):
                self._cursors[item.host_id] = item.upstream_seq
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
        observe_many(INGEST_TO_DURABLE, [done - item.received_at for item in batch])
        for kind, count in kinds.items():
            EVENTS_ACCEPTED.labels(kind).inc(count)
        if self.mirror is not None and mirrored:
            # the mirror's inbox is bounded by waiting here: our own inbox then fills up and
            # the subscribers stop reading their hosts (the firehose slows to the disk's pace)
            while self.mirror.backlog() > MIRROR_MAX_BACKLOG:
                gevent.sleep(0.005)
            self.mirror.tell(MirrorBatch(tuple(mirrored)))
        SEQUENCED_BATCH.observe(len(batch))
        LAST_SEQ.set(seq)

    def _append_durably(self, records: list[LogRecord]) -> None:
        """Append and fsync ``records``; after a failed write, repair the log and write what is missing."""

        def attempt() -> None:
            todo = [r for r in records if r.seq > self.log.last_seq]  # a repair may have kept a part
            self.log.append(todo)
            off_loop(self.log.sync)

        retry(
            attempt,
            operation="event_log_append",
            retry_on=(EventLogWriteError,),
            policy=self.retry_policy,
            repair=self.log.repair,
        )

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
        count_due = bool(self._count_hosts) and time.monotonic() - self._last_count >= ACCOUNT_COUNT_SECONDS
        if not self._accounts and not self._cursor_resets and self._cursors == self._written_cursors and not count_due:
            return
        accounts, self._accounts = self._accounts, {}
        self._count_hosts.update(a.host_id for a in accounts.values() if a.host_id)
        recount: set[int] = set()
        if self._count_hosts and time.monotonic() - self._last_count >= ACCOUNT_COUNT_SECONDS:
            recount, self._count_hosts = self._count_hosts, set()
            self._last_count = time.monotonic()
        cursors = dict(self._cursors)
        resets, self._cursor_resets = self._cursor_resets, set()
        checkpoint = self._last_seq

        def write() -> None:
            with self.db.connection_context(), self.db.atomic():
                upsert_accounts(self.db, (a.to_row() for a in accounts.values()))
                reset_cursors(self.db, resets)
                save_cursors(self.db, cursors.items())
                refresh_account_counts(self.db, recount)  # listHosts' accountCount, kept current
                if recount:
                    HOSTS_AT_ACCOUNT_LIMIT.set(hosts_at_account_limit(self.db, self.default_account_limit))
                set_state(self.db, CHECKPOINT_KEY, str(checkpoint))

        def run() -> None:
            try:
                off_loop(write)
                self._written_cursors = cursors
            except (peewee.DatabaseError, peewee.InterfaceError) as exc:  # keep the changes for the next attempt
                INFRA_RETRIES.labels("write_behind").inc()
                log.warning("write-behind failed error=%s: retrying at the next tick", str(exc).strip()[:300])
                self._cursor_resets |= resets
                self._count_hosts |= recount
                for did, state in accounts.items():
                    self._accounts.setdefault(did, state)
            finally:
                self._writer = None

        self._writer = gevent.spawn(run)
        if wait:
            self._writer.join()


def mirror_event(item: PersistEvent, seq: int = 0, body: dict[str, Any] | None = None) -> MirrorEvent | None:
    """What the repo mirror needs of a durable event with relay seq ``seq`` (None for events it ignores).

    ``body`` is the frame's decoded body when the caller has it (the sequencer's resequencing).
    """
    account = item.account
    if item.kind == "#commit":
        if body is None:
            body = libipld.decode_dag_cbor_multi(item.frame)[1]
        return MirrorEvent(
            did=body["repo"],
            kind="#commit",
            rev=body["rev"],
            since=body.get("since"),
            commit_cid=body["commit"],
            data_cid=account.data_cid if account else None,
            car=body["blocks"],
            seq=seq,
        )
    if item.kind == "#sync" and account is not None:
        return MirrorEvent(did=account.did, kind="#sync", rev=account.rev, commit_cid=account.commit_cid, seq=seq)
    if item.kind == "#account" and account is not None and account.upstream_status == "deleted":
        return MirrorEvent(did=account.did, kind="#account", deleted=True, seq=seq)
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
        saved = {h.id: h.last_seq for h in list_hosts(db, limit=1_000_000)} if info.tail else {}
        cursors, resets = tail_cursors(info.tail, saved)
        if resets:
            log.warning("recovered cursors of hosts whose history restarted hosts=%s", sorted(resets))
        with db.atomic():
            upsert_accounts(db, (s.to_row() for s in states.values()))
            reset_cursors(db, resets)
            save_cursors(db, cursors.items())
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
    elif isinstance(event, AccountEvent) and record.host_id == RELAY_HOST_ID:  # an admin status change
        state = state.updated(status=event.status if event.status in (TAKENDOWN, THROTTLED) else ACTIVE)
    elif isinstance(event, AccountEvent):
        state = state.updated(upstream_status=ACTIVE if event.active else (event.status or "deactivated"))
    states[did] = state
