"""Supervises one ``HostSubscriber`` per upstream host: starts, restarts with backoff, parks offline hosts.

A subscriber that crashes is restarted after an exponential, jittered delay. One that keeps
failing to connect gives up (``HostGaveUp``): the host is marked offline in SQL and retried
on the slow ``offline_retry_seconds`` schedule, never forgotten. Banned hosts are not started.
A database error while starting or parking a host is retried with backoff (``actors.backoff``)
and escalates (this actor fails, the relay stops) only once it has lasted the retry policy's
limit; a supervisor that fails stops its subscribers first.
A watchdog reads each subscriber's ``HostProgress``: a reader stuck on one frame for
``stall_seconds`` is logged with its stack, counted, and restarted (the frame is read again);
one stuck waiting for the sequencer is logged and counted only (a reconnect cannot help).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import peewee
import pykka

from actors.backoff import Backoff, RetryPolicy, retry_db
from actors.host_events import host_changed
from actors.host_progress import HOST_STALLS, HostProgress
from actors.host_rate import WindowLimits
from actors.host_subscriber import HostSubscriber, SubscriberConfig
from actors.messages import CheckProgress, ChildFailed, GetTree, HostGaveUp, RestartChild, StartHost, StopHost
from actors.messages_control import (
    ApplyHostLimits,
    ForgetAccount,
    RestartHost,
    SetSubscriberLimits,
    unknown_message,
)
from actors.metrics import CHILD_RESTARTS
from actors.verify import HostContext, Verifier
from store.hosts import (
    HOST_ACTIVE,
    HOST_BANNED,
    HOST_OFFLINE,
    count_host_accounts,
    ensure_host,
    get_host,
    save_account_counts,
    set_host_status,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class _Child:
    ref: Any | None
    backoff: Backoff
    generation: int = 0
    state: str = "running"  # running, restarting, offline, stopped
    last_error: str | None = None
    progress: HostProgress | None = None  # the running subscriber's, read by the watchdog
    stall_reported: float | None = None  # busy_since of the stall last reported (report each once)


class HostSupervisor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        db: peewee.Database,
        verifier: Verifier,
        sequencer: Any,
        config: SubscriberConfig,
        default_account_limit: int | None,
        default_events_per_second: float | None,
        lenient: bool,
        offline_retry_seconds: float = 900.0,
        is_banned: Callable[[str], bool] = lambda hostname: False,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__()
        self.db = db
        self.verifier = verifier
        self.sequencer = sequencer
        self.config = config
        self.default_account_limit = default_account_limit
        self.default_events_per_second = default_events_per_second
        self.lenient = lenient
        self.offline_retry_seconds = offline_retry_seconds
        self.is_banned = is_banned
        self.retry_policy = retry_policy or RetryPolicy()
        self.children: dict[str, _Child] = {}
        self._watchdog: gevent.Greenlet | None = None

    def on_start(self) -> None:
        self._watchdog = gevent.spawn(self._watch)

    def _watch(self) -> None:
        interval = max(0.2, min(5.0, self.config.stall_seconds / 4))
        while True:
            gevent.sleep(interval)
            try:
                self.actor_ref.tell(CheckProgress())
            except pykka.ActorDeadError:
                return

    def on_receive(self, message: Any) -> Any:
        match message:
            case StartHost():
                self._start(message.hostname, reset=True)
            case RestartChild():
                child = self.children.get(message.name)
                if child is not None and child.generation == message.generation and child.state != "stopped":
                    self._start(message.name, reset=False)
            case ChildFailed():
                self._failed(message.name, message.error, offline=False)
            case HostGaveUp():
                self._failed(message.hostname, message.error, offline=True)
            case StopHost():
                self._stop_child(message.hostname, message.reason)
            case RestartHost():
                self._stop_child(message.hostname, "restart")
                self._start(message.hostname, reset=True)
            case ApplyHostLimits():
                child = self.children.get(message.hostname)
                if child is not None and child.ref is not None and child.ref.is_alive():
                    limit = message.account_limit
                    rate = message.events_per_second or self.default_events_per_second
                    child.ref.tell(SetSubscriberLimits(limit, rate, message.events_per_hour, message.events_per_day))
            case ForgetAccount():
                self.verifier.accounts.forget(message.did)
            case CheckProgress():
                self._check_progress()
            case GetTree():
                return self.tree()
            case _:
                unknown_message("host_supervisor", message)
        return None

    def on_stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill(block=False)
        for hostname in list(self.children):
            self._stop_child(hostname, "shutdown")

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        # no subscriber may outlive its supervisor: a leftover one keeps the process alive
        for child in self.children.values():
            if child.ref is not None and child.ref.is_alive():
                child.ref.stop(block=False)

    def _db(self, operation: str, fn: Callable[[], T]) -> T:
        """``fn()`` (database work) off the event loop, retried with backoff while the database fails."""
        return retry_db(self.db, fn, operation=operation, policy=self.retry_policy)

    def tree(self) -> dict[str, Any]:
        kids = []
        for hostname, child in sorted(self.children.items()):
            info: dict[str, Any] = {
                "name": hostname,
                "kind": "HostSubscriber",
                "state": child.state,
                "restarts": child.generation,
                "last_error": child.last_error,
            }
            if child.progress is not None and child.state == "running":
                info["progress"] = child.progress.summary()
            kids.append(info)
        return {"name": "hosts", "kind": "HostSupervisor", "state": "running", "children": kids}

    def _start(self, hostname: str, *, reset: bool) -> None:
        if self._db("host_start", lambda: self.is_banned(hostname)):
            host_changed("blocked", hostname, reason="banned_domain")
            return

        def ensure() -> tuple[bool, Any]:
            with self.db.connection_context():
                added = get_host(self.db, hostname) is None
                return added, ensure_host(self.db, hostname, account_limit=self.default_account_limit)

        added, row = self._db("host_start", ensure)
        if added:
            host_changed("added", hostname, limited=False)
        if row.status == HOST_BANNED:
            host_changed("blocked", hostname, reason="banned")
            return
        child = self.children.get(hostname)
        if child is not None and child.ref is not None and child.ref.is_alive():
            return  # already running
        if child is None:
            child = self.children[hostname] = _Child(None, Backoff())
        if reset:
            child.backoff = Backoff()
        if row.status != HOST_ACTIVE:
            self._db("host_start", lambda: set_host_status(self.db, row.id, HOST_ACTIVE))
        ctx = HostContext(
            host_id=row.id,
            hostname=hostname,
            lenient=self.lenient or row.lenient,
            account_limit=row.account_limit if row.account_limit is not None else self.default_account_limit,
        )

        def recount() -> int:  # the accounts table is the truth; keep the host row in step
            count = count_host_accounts(self.db, row.id)
            save_account_counts(self.db, [(row.id, count)])
            return count

        account_count = self._db("host_start", recount)
        child.progress = HostProgress()
        child.stall_reported = None
        child.ref = HostSubscriber.start(
            host=ctx,
            cursor=row.last_seq,
            account_count=account_count,
            events_per_second=row.events_per_second or self.default_events_per_second,
            trusted=row.trusted,
            verifier=self.verifier,
            sequencer=self.sequencer,
            parent=self.actor_ref,
            config=self.config,
            progress=child.progress,
            own_windows=WindowLimits(row.events_per_hour, row.events_per_day),
        )
        child.state = "running"
        child.backoff.started()
        log.info("host subscriber started host=%s cursor=%d", hostname, row.last_seq)

    def _check_progress(self) -> None:
        now = time.monotonic()
        for hostname, child in list(self.children.items()):
            progress = child.progress
            if child.state != "running" or progress is None or progress.busy_since is None:
                continue
            stuck = progress.stuck_for(now)
            if stuck < self.config.stall_seconds or child.stall_reported == progress.busy_since:
                continue
            child.stall_reported = progress.busy_since
            phase = progress.phase
            HOST_STALLS.labels(phase).inc()
            log.warning(
                "host stalled host=%s phase=%s stuck_seconds=%.1f read=%d processed=%d%s\n%s",
                hostname, phase, stuck, progress.read, progress.processed,
                "" if phase != "backpressure" else " (waiting for the sequencer: not restarted)", progress.where(),
            )  # fmt: skip
            if phase != "backpressure":
                self._failed(hostname, f"stalled for {stuck:.0f}s in {phase}", offline=False)

    def _failed(self, hostname: str, error: str, *, offline: bool) -> None:
        child = self.children.get(hostname)
        if child is None or child.state == "stopped":
            return
        child.last_error = error
        if child.ref is not None and child.ref.is_alive():
            child.ref.stop(block=False)
        child.ref = None
        child.progress = None
        child.generation += 1
        if offline:
            child.state = "offline"
            delay = self.offline_retry_seconds

            def park() -> None:
                row = ensure_host(self.db, hostname)
                set_host_status(self.db, row.id, HOST_OFFLINE, error[:500])

            self._db("host_offline", park)
            host_changed("offline", hostname, reason="failures", error=repr(error), retry_in_s=round(delay))
            CHILD_RESTARTS.labels("host_offline").inc()
        else:
            child.state = "restarting"
            delay = child.backoff.next_delay()
            log.warning("host subscriber failed host=%s error=%s restart_in=%.1fs", hostname, error, delay)
            CHILD_RESTARTS.labels("host_subscriber").inc()
        gevent.spawn_later(delay, self.actor_ref.tell, RestartChild(hostname, child.generation))

    def _stop_child(self, hostname: str, reason: str) -> None:
        child = self.children.get(hostname)
        if child is None:
            return
        child.state = "stopped"
        child.generation += 1
        if child.ref is not None and child.ref.is_alive():
            child.ref.stop(block=True, timeout=10)
        child.ref = None
        log.info("host subscriber stopped host=%s reason=%s", hostname, reason)
