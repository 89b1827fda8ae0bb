"""Supervises one ``HostSubscriber`` per upstream host: starts, restarts with backoff, parks offline hosts.

A subscriber that crashes is restarted after an exponential, jittered delay. One that keeps
failing to connect gives up (``HostGaveUp``): the host is marked offline in SQL and retried
on the slow ``offline_retry_seconds`` schedule, never forgotten. Banned hosts are not started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import peewee
import pykka

from actors.backoff import Backoff
from actors.host_subscriber import HostSubscriber, SubscriberConfig
from actors.messages import ChildFailed, GetTree, HostGaveUp, RestartChild, StartHost, StopHost
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
    save_account_counts,
    set_host_status,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Child:
    ref: Any | None
    backoff: Backoff
    generation: int = 0
    state: str = "running"  # running, restarting, offline, stopped
    last_error: str | None = None


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
        self.children: dict[str, _Child] = {}

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
                    child.ref.tell(SetSubscriberLimits(limit, rate))
            case ForgetAccount():
                self.verifier.accounts.forget(message.did)
            case GetTree():
                return self.tree()
            case _:
                unknown_message("host_supervisor", message)
        return None

    def on_stop(self) -> None:
        for hostname in list(self.children):
            self._stop_child(hostname, "shutdown")

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
            kids.append(info)
        return {"name": "hosts", "kind": "HostSupervisor", "state": "running", "children": kids}

    def _start(self, hostname: str, *, reset: bool) -> None:
        if self.is_banned(hostname):
            log.info("host not started: banned host=%s", hostname)
            return
        with self.db.connection_context():
            row = ensure_host(self.db, hostname, account_limit=self.default_account_limit)
        if row.status == HOST_BANNED:
            return
        child = self.children.get(hostname)
        if child is not None and child.ref is not None and child.ref.is_alive():
            return  # already running
        if child is None:
            child = self.children[hostname] = _Child(None, Backoff())
        if reset:
            child.backoff = Backoff()
        if row.status != HOST_ACTIVE:
            with self.db.connection_context():
                set_host_status(self.db, row.id, HOST_ACTIVE)
        ctx = HostContext(
            host_id=row.id,
            hostname=hostname,
            lenient=self.lenient or row.lenient,
            account_limit=row.account_limit if row.account_limit is not None else self.default_account_limit,
        )
        with self.db.connection_context():  # the accounts table is the truth; keep the host row in step
            account_count = count_host_accounts(self.db, row.id)
            save_account_counts(self.db, [(row.id, account_count)])
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
        )
        child.state = "running"
        child.backoff.started()
        log.info("host subscriber started host=%s cursor=%d", hostname, row.last_seq)

    def _failed(self, hostname: str, error: str, *, offline: bool) -> None:
        child = self.children.get(hostname)
        if child is None or child.state == "stopped":
            return
        child.last_error = error
        if child.ref is not None and child.ref.is_alive():
            child.ref.stop(block=False)
        child.ref = None
        child.generation += 1
        if offline:
            child.state = "offline"
            delay = self.offline_retry_seconds
            with self.db.connection_context():
                row = ensure_host(self.db, hostname)
                set_host_status(self.db, row.id, HOST_OFFLINE, error[:500])
            log.warning("host offline host=%s error=%s retry_in=%.0fs", hostname, error, delay)
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
