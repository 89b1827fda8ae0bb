"""The relay's supervision tree: start storage-facing actors in order, watch them, stop in reverse.

``RelaySupervisor`` is the root: Broadcaster -> Sequencer -> IdentityResolver -> HostSupervisor
(which owns one HostSubscriber per host). The sequencer and the broadcaster are essential:
if either dies the relay cannot keep its promises (durable, ordered output), so the process
stops with a non-zero status. The identity resolver is restarted with backoff. pykka has no
supervision; failures are seen by a watchdog that checks the children's liveness. ``stop()``
stops the tree in reverse order, then any actor still registered with pykka (a subscriber
orphaned by a failed supervisor would otherwise keep the process alive).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import gevent.event
import peewee
import pykka

from actors.accounts import AccountCache
from actors.backoff import Backoff, RetryPolicy
from actors.broadcaster import Broadcaster, ConsumerRegistry
from actors.crawl import is_banned
from actors.enumerator import EnumeratorConfig, HostEnumerator
from actors.host_activity import HostActivity
from actors.host_subscriber import SubscriberConfig
from actors.host_supervisor import HostSupervisor
from actors.identity import IdentityDirectory, IdentityResolver
from actors.import_resume import resume_imports
from actors.ingest_pool import IngestPool
from actors.lookahead import LookAhead
from actors.messages import GetTree, StartHost, Tick
from actors.metrics import CHILD_RESTARTS
from actors.mirror import MirrorConfig, RepoMirror
from actors.outbound import OutboundClient
from actors.sequencer import Sequencer, recover
from actors.stack_dump import install_stack_dump
from actors.verify import Verifier, VerifyLimits
from config.settings import Settings
from store.carstore import CarStore
from store.db import open_database
from store.eventlog import EventLog
from store.hosts import HOST_ACTIVE, HOST_OFFLINE, banned_domains, list_hosts

log = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 0.5
TICK_SECONDS = 1.0
ASK_TIMEOUT_SECONDS = 5.0


class Forwarder:
    """A stable address for a restartable actor: ``tell`` goes to its current incarnation.

    While the actor is down, messages are dropped and counted; the repo mirror heals such a
    gap itself (the next commit does not follow its head, so it backfills the account).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ref: Any = None

    def backlog(self) -> int:
        """Messages waiting in the current incarnation's inbox (0 while it is down)."""
        ref = self.ref
        return int(ref.actor_inbox.qsize()) if ref is not None else 0

    def tell(self, message: Any) -> None:
        ref = self.ref
        if ref is None:
            CHILD_RESTARTS.labels(f"{self.name}_message_dropped").inc()
            return
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            CHILD_RESTARTS.labels(f"{self.name}_message_dropped").inc()


class RelaySupervisor:
    """Owns the actor tree of one relay process. ``start()``, then ``wait()``; ``stop()`` on signal."""

    def __init__(self, settings: Settings, db: peewee.Database, carstore_db: peewee.Database | None = None) -> None:
        self.settings = settings
        self.db = db
        self.retry_policy = RetryPolicy(give_up_after_seconds=settings.infra_retry_seconds)
        self.registry = ConsumerRegistry()
        self.event_log = EventLog(
            settings.data_dir / "events",
            db,
            retention_seconds=settings.replay_window_hours * 3600,
        )
        self.outbound = OutboundClient.from_settings(settings)  # every outbound call goes through it
        self.directory = IdentityDirectory(
            db,
            plc_url=settings.plc_url,
            allow_insecure_hosts=settings.allow_insecure_hosts,
            ttl_seconds=settings.identity_ttl_seconds,
            outbound=self.outbound,
        )
        self.accounts = AccountCache(db, retry_policy=self.retry_policy)
        self.activity = HostActivity()  # connected hosts and their last frames (the idle host status)
        self.verifier = Verifier(
            self.directory,
            self.accounts,
            VerifyLimits(
                max_ops=settings.max_commit_ops,
                max_rev_future_seconds=settings.max_rev_future_seconds,
                lenient=settings.lenient_sync_validation,
            ),
        )
        self.fatal = gevent.event.Event()
        self.fatal_reason: str | None = None
        self.broadcaster: Any = None
        self.sequencer: Any = None
        self.identity: Any = None
        self.hosts: Any = None
        self.enumerator: Any = None
        self.spider: Any = None  # actors.spider.Spider, set by the front end's composition (needs Relay)
        self._identity_backoff = Backoff()
        self._mirror_backoff = Backoff()
        self.mirror = Forwarder("mirror")
        self.carstore_db: peewee.Database | None = None
        self.carstore: CarStore | None = None
        if settings.mirror_enabled:
            self.carstore_db = carstore_db or open_database(settings.effective_carstore_database_url())
            self.carstore = CarStore(settings.data_dir / "repos", self.carstore_db)
        self._stopping = False
        self._greenlets: list[gevent.Greenlet] = []
        self.started_at = time.time()

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        install_stack_dump()  # kill -USR1: every greenlet's stack in the log
        last_seq = recover(self.db, self.event_log)
        log.info("event log open last_seq=%d first_seq=%d", last_seq, self.event_log.first_seq)
        self.broadcaster = Broadcaster.start(self.registry)
        if self.carstore is not None:
            self.carstore.open()
            self._start_mirror()
        self.sequencer = Sequencer.start(
            self.db,
            self.event_log,
            self.broadcaster,
            prune_interval_seconds=60.0,
            batch_window_seconds=self.settings.sequencer_batch_window_seconds,
            mirror=self.mirror if self.carstore is not None else None,
            retry_policy=self.retry_policy,
            discovered=self._offer_batch_to_spider,
            moved=self._offer_moved_to_spider,
            default_account_limit=self.settings.default_host_account_limit,
        )
        self._start_identity()
        if self.settings.ingest_workers > 0:
            self.hosts = IngestPool(self.settings, self.sequencer, self.settings.ingest_workers).start()
        else:
            self.hosts = HostSupervisor.start(
                db=self.db,
                verifier=self.verifier,
                sequencer=self.sequencer,
                config=SubscriberConfig.from_settings(
                    self.settings, self.activity, LookAhead(self.directory, self.accounts)
                ),
                offline_retry_seconds=self.settings.offline_retry_seconds,
                default_account_limit=self.settings.default_host_account_limit,
                default_events_per_second=self.settings.default_host_events_per_second,
                lenient=self.settings.lenient_sync_validation,
                is_banned=self._is_banned,
                retry_policy=self.retry_policy,
            )
        with self.db.connection_context():
            known = [
                h.hostname for h in list_hosts(self.db, limit=1_000_000) if h.status in (HOST_ACTIVE, HOST_OFFLINE)
            ]
        for hostname in dict.fromkeys([*known, *self.settings.crawl_hosts]):
            self.hosts.tell(StartHost(hostname))
        if self.settings.enumerate_hosts:  # walks every followed host's listRepos (resumes unfinished walks)
            mirror = self.mirror if self.carstore is not None else None
            config = EnumeratorConfig.from_settings(self.settings)
            self.enumerator = HostEnumerator.start(self.db, self.outbound, mirror, config, self.retry_policy)
        self._greenlets = [gevent.spawn(self._watch), gevent.spawn(self._tick)]
        if self.carstore is not None:  # backfills of DID-list imports cut short by a crash or a stop
            args = (self.db, self.carstore, self.mirror, self.settings.enumerate_max_backfill_queue)
            self._greenlets.append(gevent.spawn(resume_imports, *args))

    def _start_mirror(self) -> None:
        assert self.carstore is not None
        if self._stopping:
            return
        self.mirror.ref = RepoMirror.start(
            self.carstore,
            self.directory,
            MirrorConfig(
                max_concurrent_fetches=self.settings.backfill_concurrency,
                max_fetches_per_host=self.settings.backfill_per_host,
                compaction_min_slices=self.settings.compaction_min_slices,
                compaction_interval_seconds=self.settings.compaction_interval_seconds,
                allow_insecure_hosts=self.settings.allow_insecure_hosts,
                fetch_total_seconds=self.settings.backfill_fetch_total_seconds,
                flush_seconds=self.settings.mirror_flush_seconds,
            ),
            outbound=self.outbound,
            discovered=self._offer_to_spider,
            event_log=self.event_log,
        )
        self._mirror_backoff.started()

    def _offer_to_spider(self, did: str, car: bytes | None = None, blocks: tuple[bytes, ...] = ()) -> None:
        if self.spider is not None:
            self.spider.offer(did, car, blocks)

    def _offer_batch_to_spider(self, batch: list[Any]) -> None:
        if self.spider is not None:  # every durable event, mirror or not; the mirror offers only fetched repos
            self.spider.offer_durable(batch)

    def _offer_moved_to_spider(self, did: str) -> None:
        if self.spider is not None:  # wrong_host drops, in process or from an ingest worker
            self.spider.offer_moved(did)

    def _start_identity(self) -> None:
        if self._stopping:
            return
        self.identity = IdentityResolver.start(self.directory)
        self._identity_backoff.started()

    def _is_banned(self, hostname: str) -> bool:
        with self.db.connection_context():
            return is_banned(hostname, banned_domains(self.db))

    def wait(self, stop: gevent.event.Event) -> int:
        """Block until ``stop`` is set or an essential actor dies; return the exit status."""
        while not stop.is_set() and not self.fatal.is_set():
            gevent.wait([stop, self.fatal], count=1, timeout=5)
        return 1 if self.fatal.is_set() else 0

    def stop(self) -> None:
        """Stop in reverse start order: hosts (flush cursors), identity, sequencer (sync log), broadcaster."""
        self._stopping = True
        if self.spider is not None:
            self.spider.stop()
        last_seq = self.event_log.last_seq
        for g in self._greenlets:
            g.kill(block=False)
        for ref in (self.enumerator, self.hosts, self.identity, self.sequencer, self.mirror.ref, self.broadcaster):
            if ref is not None and ref.is_alive():
                try:
                    ref.stop(block=True, timeout=30)
                except Exception:
                    log.exception("actor did not stop cleanly")
        for ref in reversed(pykka.ActorRegistry.get_all()):  # orphans, e.g. of a failed supervisor
            log.warning("stopping a leftover actor actor=%s", ref.actor_class.__name__)
            try:
                ref.stop(block=True, timeout=10)
            except Exception:
                log.exception("leftover actor did not stop actor=%s", ref.actor_class.__name__)
        for consumer in self.registry.consumers():
            consumer.close()
        if self.carstore is not None:
            self.carstore.close()
        log.info("relay stopped last_seq=%d", last_seq)

    # -- watching -----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping:
            gevent.sleep(WATCH_INTERVAL_SECONDS)
            if self._stopping:
                return
            for name, ref in (("sequencer", self.sequencer), ("broadcaster", self.broadcaster),
                              ("hosts", self.hosts)):  # fmt: skip
                if ref is not None and not ref.is_alive():
                    self.fatal_reason = f"{name} stopped unexpectedly"
                    log.error("essential actor died actor=%s: stopping the relay", name)
                    self.fatal.set()
                    return
            mirror = self.mirror.ref
            if mirror is not None and not mirror.is_alive():
                delay = self._mirror_backoff.next_delay()
                log.warning("repo mirror died: restarting in %.1fs", delay)
                CHILD_RESTARTS.labels("repo_mirror").inc()
                self.mirror.ref = None
                gevent.spawn_later(delay, self._start_mirror)
            if self.identity is not None and not self.identity.is_alive():
                delay = self._identity_backoff.next_delay()
                log.warning("identity resolver died: restarting in %.1fs", delay)
                CHILD_RESTARTS.labels("identity_resolver").inc()
                self.identity = None
                gevent.spawn_later(delay, self._start_identity)

    def _tick(self) -> None:
        while not self._stopping:
            gevent.sleep(TICK_SECONDS)
            if self.sequencer is not None and self.sequencer.is_alive():
                self.sequencer.tell(Tick())

    # -- for the control plane (actors.relay_api) ---------------------------------------------
    def restart(self, name: str) -> bool:
        """Stop a restartable child (``identity``, ``mirror``); the watchdog starts it again. False: not one."""
        ref = {"identity": self.identity, "mirror": self.mirror.ref}.get(name)
        if ref is None:
            return False
        log.warning("actor restart requested actor=%s", name)
        ref.stop(block=False)
        return True

    # -- for the web layer --------------------------------------------------------------------
    def tree(self) -> dict[str, Any]:
        def leaf(name: str, kind: str, ref: Any) -> dict[str, Any]:
            alive = ref is not None and ref.is_alive()
            return {"name": name, "kind": kind, "state": "running" if alive else "stopped", "children": []}

        children = [
            leaf("broadcaster", "Broadcaster", self.broadcaster),
            leaf("sequencer", "Sequencer", self.sequencer),
            leaf("identity", "IdentityResolver", self.identity),
            leaf("mirror", "RepoMirror", self.mirror.ref),
            leaf("enumerator", "HostEnumerator", self.enumerator),
        ]
        if self.hosts is not None and self.hosts.is_alive():
            children.append(self.hosts.ask(GetTree(), timeout=ASK_TIMEOUT_SECONDS))
        return {"name": "relay", "kind": "RelaySupervisor", "state": "running", "children": children}
