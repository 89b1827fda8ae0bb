"""The repo mirror: writes every durable commit's blocks to the carstore, backfills what it lacks.

``RepoMirror`` receives ``MirrorBatch`` from the sequencer after each durable batch. A commit
that follows the mirrored head (``since`` == head rev, or a genesis commit) becomes a slice.
Anything else — an account first seen mid-history, a gap, a ``#sync`` — starts a backfill:
``getRepo`` from the account's PDS, verified whole (``protocol.repo_verify``), then swapped in
atomically with ``replace_repo``. Live commits that arrive during a fetch are held and applied
after it in order, so none is lost. Fetch concurrency is bounded overall and per host.
``#account`` deleted removes the mirror. Compaction runs on a timer in the thread pool.
"""

from __future__ import annotations

import logging
import tempfile
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pykka
from prometheus_client import Counter, Gauge, Histogram

from actors import tracing
from actors.backoff import RetryPolicy, retry
from actors.blocking import off_loop
from actors.messages_control import unknown_message
from actors.messages_mirror import (
    BackfillDone,
    CompactNow,
    CompactRepo,
    FlushMirror,
    MirrorBatch,
    MirrorEvent,
    RequestResync,
    ResetRepo,
)
from actors.mirror_replay import missed_events
from actors.outbound import Limits, OutboundClient
from actors.outbound_errors import OutboundError
from actors.verify import host_of_endpoint
from protocol.crypto import load_did_key
from protocol.errors import ProtocolError
from protocol.repo_verify import verify_repo
from store.carstore import CarStore, SliceWrite
from store.db import TRANSIENT_DB_ERRORS
from store.eventlog import EventLog

log = logging.getLogger(__name__)
_DB_RETRY = RetryPolicy()  # carstore metadata: a database outage is retried this long, then the mirror fails
# mirrored heads kept in memory (210 bytes each: scripts/bench_account_lookup.py); a batch
# reads the others with one query
MAX_HEADS = 200_000

SLICES_WRITTEN = Counter("skyrelay_mirror_slices_written_total", "Commit slices written to the repo mirror")
BACKFILLS = Counter("skyrelay_mirror_backfills_total", "Whole-repo fetches, by result", ["result"])
BACKFILL_SECONDS = Histogram("skyrelay_mirror_backfill_seconds", "Time to fetch and verify a whole repo")
BACKFILL_QUEUE = Gauge("skyrelay_mirror_backfill_queue", "Accounts waiting for a backfill", multiprocess_mode="max")
REPLAYED = Counter("skyrelay_mirror_replayed_events_total", "Durable events the mirror read back from the event log")
HELD_DROPPED = Counter("skyrelay_mirror_held_dropped_total", "Live commits dropped while a backfill ran too long")


def queued_backfills() -> int:
    """Accounts waiting for a backfill in this process's mirror (what producers such as enumeration pace on)."""
    return int(BACKFILL_QUEUE._value.get())


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    max_concurrent_fetches: int = 8
    max_fetches_per_host: int = 2
    fetch_timeout_seconds: float = 60.0
    max_repo_bytes: int = 512 * 1024 * 1024
    max_held_per_account: int = 2000
    retry_seconds: float = 60.0
    max_attempts: int = 5
    compaction_min_slices: int = 32
    compaction_interval_seconds: float = 60.0
    allow_insecure_hosts: bool = False
    fetch_total_seconds: float = 900.0  # a whole getRepo download; fetch_timeout_seconds is per read
    flush_seconds: float = 0.25  # live slices gathered this long into one pack file and transaction
    flush_max_slices: int = 5000  # ... or until this many wait
    max_replay_events: int = 2_000_000  # a longer log tail past the checkpoint is left to gap backfills


def fetch_repo(client: OutboundClient, pds_endpoint: str, did: str, limits: Limits, spool_dir: Path) -> bytes:
    """``getRepo`` of ``did`` through the outbound client, spooled to an unnamed file in ``spool_dir``.

    The network side holds at most one read buffer in memory; the CAR is read back once, whole,
    for ``verify_repo``. ``OutboundError`` on any failure (``TooLarge`` past ``limits.max_bytes``).
    """
    url = f"{pds_endpoint.rstrip('/')}/xrpc/com.atproto.sync.getRepo?did={urllib.parse.quote(did)}"
    with tempfile.TemporaryFile(dir=spool_dir, prefix="getrepo-") as spool:
        client.get(url, limits, headers={"Accept": "application/vnd.ipld.car"}, sink=spool)
        spool.seek(0)
        return off_loop(spool.read)


class RepoMirror(pykka.ThreadingActor):
    def __init__(
        self,
        carstore: CarStore,
        identities: Any,
        config: MirrorConfig,
        *,
        outbound: OutboundClient | None = None,
        discovered: Callable[..., None] | None = None,
        event_log: EventLog | None = None,
    ) -> None:
        super().__init__()
        self.event_log = event_log  # read back from the checkpoint at start (None: no replay)
        self._applied_seq = 0  # the last relay seq applied (written, held or ignored)
        self.discovered = discovered  # the spider's non-blocking offer(did, None, blocks) of fetched repos, or None
        self.carstore = carstore
        self.identities = identities
        self.config = config
        self.outbound = outbound or OutboundClient.for_settings(config.allow_insecure_hosts)
        self._heads: OrderedDict[str, str] = OrderedDict()  # did -> mirrored head rev (LRU)
        self._headless: set[str] = set()  # dids of the batch in hand the mirror has no repo for
        self._pending: list[SliceWrite] = []
        self._flush_queued = False
        self._held: dict[str, list[MirrorEvent]] = {}  # dids being backfilled -> live commits held
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._active: dict[str, str] = {}  # did -> host, fetches in flight
        self._again: set[str] = set()  # asked for while in flight: fetched once more after it
        self._attempts: dict[str, int] = {}
        self._timer: gevent.Greenlet | None = None

    def on_start(self) -> None:
        self._replay()
        self._timer = gevent.spawn(self._tick)

    def _replay(self) -> None:
        """Apply what the event log holds past the mirror's checkpoint (before any live batch)."""
        if self.event_log is None:
            return
        upto = self.event_log.last_seq
        checkpoint = retry(lambda: off_loop(self.carstore.mirror_seq), operation="mirror_read",
                           retry_on=TRANSIENT_DB_ERRORS, policy=_DB_RETRY)  # fmt: skip
        if checkpoint is None or checkpoint > upto or upto - checkpoint > self.config.max_replay_events:
            if checkpoint is not None and checkpoint < upto:
                log.warning("mirror replay skipped: %d events past its checkpoint (gaps heal by backfill)",
                            upto - checkpoint)  # fmt: skip
            self._applied_seq = upto
            retry(lambda: off_loop(lambda: self.carstore.write_slices([], mirror_seq=upto)), operation="mirror_write",
                  retry_on=TRANSIENT_DB_ERRORS, policy=_DB_RETRY)  # fmt: skip
            return
        self._applied_seq = checkpoint
        replayed = 0
        for chunk in missed_events(self.event_log, checkpoint, upto):
            self._prefetch_heads(chunk)
            for event in chunk:
                self._replay_one(event)
                replayed += 1
            self._headless.clear()
            if len(self._pending) >= self.config.flush_max_slices:
                self._flush()
            gevent.sleep(0)
        self._applied_seq = max(self._applied_seq, upto)
        self._flush()
        REPLAYED.inc(replayed)
        if replayed:
            log.info("mirror replayed the event log from=%d to=%d events=%d", checkpoint, upto, replayed)

    def _replay_one(self, event: MirrorEvent) -> None:
        if event.kind in ("#commit", "#sync") and event.did not in self._held and event.rev is not None:
            head = self._head(event.did)
            if head is not None and head >= event.rev:  # already in the mirror
                self._applied_seq = event.seq
                return
        self._apply(event)
        self._applied_seq = event.seq

    def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)
        self._flush()

    def _tick(self) -> None:
        while True:
            gevent.sleep(self.config.compaction_interval_seconds)
            self.actor_ref.tell(CompactNow())

    # -- messages -----------------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        match message:
            case MirrorBatch():
                self._prefetch_heads(message.events)
                try:
                    for event in message.events:
                        if event.seq and event.seq <= self._applied_seq:
                            continue  # read back from the log at start already
                        self._apply(event)
                        if event.seq:
                            self._applied_seq = event.seq
                finally:
                    self._headless.clear()
                self._flush_soon()
            case FlushMirror():
                self._flush_queued = False
                self._flush()
            case RequestResync():
                self._flush()
                self._start_backfill(message.did, message.reason)
            case BackfillDone():
                self._backfilled(message)
                if message.did in self._again:
                    self._again.discard(message.did)
                    self._start_backfill(message.did, "asked again while fetching")
            case CompactNow():
                self._compact(message.limit)
            case ResetRepo():
                self._flush()
                if message.did not in self._active:
                    self._forget(message.did)
                    off_loop(lambda: self.carstore.delete_repo(message.did))
                self._start_backfill(message.did, "admin_reset")
            case CompactRepo():
                self._flush()
                if message.did in self._held or message.did in self._active:
                    return None
                if off_loop(lambda: self.carstore.head(message.did)) is None:
                    return None
                return off_loop(lambda: self.carstore.compact(message.did))
            case _:
                unknown_message("repo_mirror", message)
        return None

    # -- live events --------------------------------------------------------------------------
    def _prefetch_heads(self, events: Any) -> None:
        """Read the heads of the batch's accounts not in memory with one query (per 500 DIDs)."""
        dids = {e.did for e in events if e.kind in ("#commit", "#sync") and e.did not in self._heads}
        if not dids:
            return
        heads = retry(lambda: off_loop(lambda: self.carstore.heads(dids)), operation="mirror_read",
                      retry_on=TRANSIENT_DB_ERRORS, policy=_DB_RETRY)  # fmt: skip
        for did, head in heads.items():
            self._remember(did, head.rev)
        self._headless = dids - heads.keys()

    def _head(self, did: str) -> str | None:
        rev = self._heads.get(did)
        if rev is not None:
            self._heads.move_to_end(did)
            return rev
        if did in self._headless:  # read for this batch already: no repo
            return None
        # a database outage is waited out here (the sequencer waits for us past a bound) rather
        # than crashing: a restarted mirror would have dropped the events meanwhile
        head = retry(lambda: off_loop(lambda: self.carstore.head(did)), operation="mirror_read",
                     retry_on=TRANSIENT_DB_ERRORS, policy=_DB_RETRY)  # fmt: skip
        if head is None:
            return None
        self._remember(did, head.rev)
        return head.rev

    def _remember(self, did: str, rev: str) -> None:
        self._heads[did] = rev
        self._heads.move_to_end(did)
        while len(self._heads) > MAX_HEADS:
            self._heads.popitem(last=False)

    def _apply(self, event: MirrorEvent) -> None:
        did = event.did
        if event.kind == "#account":
            if event.deleted:
                self._forget(did)
                self._flush()
                off_loop(lambda: self.carstore.delete_repo(did))
            return
        if event.kind == "#sync":
            if did not in self._held and event.rev is not None and self._head(did) == event.rev:
                return  # restates the commit the mirror already has (account creation, activation)
            self._flush()
            self._start_backfill(did, "sync")
            return
        if did in self._held:
            self._hold(event)
            return
        head = self._head(did)
        follows = event.since == head if head is not None else event.since is None
        if not follows:
            self._hold(event)
            self._flush()
            self._start_backfill(did, "gap" if head is not None else "first_seen")
            return
        self._write(event)

    def _write(self, event: MirrorEvent) -> None:
        assert event.car is not None and event.rev and event.commit_cid and event.data_cid
        # the event's CAR was verified on ingest (every hash, root = commit): stored as it came
        self._pending.append(
            SliceWrite(event.did, event.rev, event.since, event.commit_cid, event.data_cid, (), car=event.car)
        )
        self._remember(event.did, event.rev)

    def _flush_soon(self) -> None:
        """Write the gathered slices once ``flush_seconds`` have passed, or now past ``flush_max_slices``."""
        if len(self._pending) >= self.config.flush_max_slices:
            self._flush()
        elif self._pending and not self._flush_queued:
            self._flush_queued = True
            gevent.spawn_later(self.config.flush_seconds, self._tell_quietly, FlushMirror())

    def _flush(self) -> None:
        writes, self._pending = self._pending, []
        if writes:  # a failed attempt leaves its pack under a pending row, removed at the next open()
            # the checkpoint: every event up to it is written here, held for a backfill, or ignored
            seq = self._applied_seq if self.event_log is not None else None
            retry(lambda: off_loop(lambda: self.carstore.write_slices(writes, mirror_seq=seq)),
                  operation="mirror_write", retry_on=TRANSIENT_DB_ERRORS, policy=_DB_RETRY)  # fmt: skip
            SLICES_WRITTEN.inc(len(writes))

    def _forget(self, did: str) -> None:
        self._heads.pop(did, None)
        self._headless.discard(did)
        self._held.pop(did, None)
        self._again.discard(did)
        self._pending = [w for w in self._pending if w.did != did]
        if did in self._queued:
            self._queued.discard(did)
            self._queue = deque(d for d in self._queue if d != did)

    def _hold(self, event: MirrorEvent) -> None:
        held = self._held.setdefault(event.did, [])
        if event.kind == "#commit":
            if len(held) >= self.config.max_held_per_account:
                HELD_DROPPED.inc(len(held))
                held.clear()  # the backfill that follows fetches a newer repo anyway
            held.append(event)

    # -- backfill -----------------------------------------------------------------------------
    def _start_backfill(self, did: str, reason: str) -> None:
        self._held.setdefault(did, [])
        if did in self._active:  # the fetch in flight may predate what this request is about
            self._again.add(did)
            return
        if did in self._queued:
            return
        log.info("mirror backfill queued did=%s reason=%s", did, reason)
        self._queue.append(did)
        self._queued.add(did)
        self._pump()

    def _pump(self) -> None:
        BACKFILL_QUEUE.set(len(self._queue))
        skipped: list[str] = []
        while self._queue and len(self._active) < self.config.max_concurrent_fetches:
            did = self._queue.popleft()
            try:
                ident = self.identities.resolve(did)
            except Exception as exc:  # no identity: retry later
                self._queued.discard(did)
                self._retry(did, f"identity: {exc}")
                continue
            host = host_of_endpoint(ident.pds_endpoint) or "?"
            if sum(1 for h in self._active.values() if h == host) >= self.config.max_fetches_per_host:
                skipped.append(did)
                continue
            self._queued.discard(did)
            self._active[did] = host
            gevent.spawn(self._fetch, did, ident)
        for did in reversed(skipped):
            self._queue.appendleft(did)
        BACKFILL_QUEUE.set(len(self._queue))

    def _fetch(self, did: str, ident: Any) -> None:
        """Fetch and verify ``did``'s repo; always answers ``BackfillDone``, which gives the slot back."""
        started = time.monotonic()
        done = BackfillDone(did, None, "interrupted")
        with tracing.span("mirror.backfill", did=did, pds=ident.pds_endpoint) as backfill:
            try:
                if not ident.pds_endpoint:
                    raise ValueError("no PDS endpoint in the DID document")
                cfg = self.config
                limits = Limits(cfg.fetch_total_seconds, cfg.fetch_timeout_seconds, cfg.max_repo_bytes)
                with tracing.span("mirror.fetch", did=did) as fetch:
                    data = fetch_repo(self.outbound, ident.pds_endpoint, did, limits, self.carstore.directory)
                    if fetch is not None:
                        fetch.set_attribute("bytes", len(data))
                key = load_did_key(ident.signing_key) if ident.signing_key else None
                if key is None:
                    raise ValueError("no signing key in the DID document")
                with tracing.span("mirror.verify", did=did) as verify:
                    repo = off_loop(lambda: verify_repo(data, did, key, max_bytes=self.config.max_repo_bytes))
                    if verify is not None:
                        verify.set_attribute("rev", repo.commit.rev)
                BACKFILL_SECONDS.observe(time.monotonic() - started)
                done = BackfillDone(did, repo, None)
            except (OutboundError, OSError, ValueError, ProtocolError) as exc:
                if backfill is not None:
                    backfill.set_attribute("error", type(exc).__name__)
                done = BackfillDone(did, None, f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug or an unforeseen failure: still a failed backfill, never a lost slot
                log.exception("mirror backfill raised did=%s", did)
                done = BackfillDone(did, None, f"{type(exc).__name__}: {exc}")
            finally:
                self._tell_quietly(done)

    def _backfilled(self, done: BackfillDone) -> None:
        self._active.pop(done.did, None)
        did = done.did
        if did not in self._held:  # deleted meanwhile
            self._pump()
            return
        if done.repo is None:
            BACKFILLS.labels("failed").inc()
            log.warning("mirror backfill failed did=%s error=%s", did, done.error)
            self._retry(did, done.error or "failed")
            self._pump()
            return
        repo = done.repo
        rev = repo.commit.rev
        head = self._head(did)
        if head is not None and rev < head:  # a lagging PDS (or cache): never move the mirror back
            BACKFILLS.labels("stale").inc()
            log.warning("mirror backfill older than the mirror did=%s fetched=%s head=%s", did, rev, head)
            held = self._held.pop(did, [])
            self._attempts.pop(did, None)
            for event in held:
                self._apply(event)
            self._pump()
            return
        off_loop(
            lambda: self.carstore.replace_repo(
                SliceWrite(did, rev, None, repo.commit_cid, repo.commit.data, list(repo.blocks.items()))
            )
        )
        BACKFILLS.labels("ok").inc()
        if self.discovered is not None:
            self.discovered(did, None, tuple(repo.blocks.values()))
        self._attempts.pop(did, None)
        self._remember(did, rev)
        held = self._held.pop(did, [])
        log.info("mirror backfilled did=%s rev=%s records=%d held=%d", did, rev, len(repo.records), len(held))
        for event in held:
            if event.rev is not None and event.rev <= rev:
                continue  # already in the fetched repo
            self._apply(event)
        self._flush_soon()
        self._pump()

    def _retry(self, did: str, error: str) -> None:
        attempts = self._attempts.get(did, 0) + 1
        self._attempts[did] = attempts
        if attempts >= self.config.max_attempts:
            log.warning("mirror backfill gave up did=%s attempts=%d error=%s", did, attempts, error)
            BACKFILLS.labels("gave_up").inc()
            self._held.pop(did, None)
            self._attempts.pop(did, None)
            return
        delay = self.config.retry_seconds * attempts
        gevent.spawn_later(delay, self._tell_quietly, RequestResync(did, "retry"))

    def _tell_quietly(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass

    # -- compaction ---------------------------------------------------------------------------
    @tracing.traced("mirror.compact")
    def _compact(self, limit: int) -> None:
        self._flush()
        dids = off_loop(lambda: self.carstore.accounts_needing_compaction(self.config.compaction_min_slices, limit))
        for did in dids:
            if did in self._held or did in self._active:
                continue
            try:
                off_loop(lambda d=did: self.carstore.compact(d))  # type: ignore[misc]
            except Exception:
                log.exception("mirror compaction failed did=%s", did)
