"""An ingest worker process: upstream subscribers and verification for a shard of hosts.

Started by ``actors.ingest_pool`` as ``python -m actors.ingest_worker --fd N``; it reads its
settings (JSON, secrets left out) from stdin, then runs a ``HostSupervisor`` with the usual
``HostSubscriber`` actors whose sequencer is a ``RemoteSequencer``: accepted events travel to
the relay process in batches over the socket. The worker exits when the relay goes away, and
with status 1 when its host supervisor fails (a database error that outlasted its retries),
after stopping every actor: the relay then starts it again with backoff.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import pykka  # noqa: E402

from actors import tracing  # noqa: E402
from actors.accounts import AccountCache  # noqa: E402
from actors.backoff import RetryPolicy  # noqa: E402
from actors.crawl import is_banned  # noqa: E402
from actors.host_subscriber import SubscriberConfig  # noqa: E402
from actors.host_supervisor import HostSupervisor  # noqa: E402
from actors.identity import IdentityDirectory, IdentityResolver  # noqa: E402
from actors.ingest_link import (  # noqa: E402
    MAX_BATCH_EVENTS,
    LinkClosed,
    encode_cursors,
    encode_events,
    recv_message,
    send_message,
)
from actors.lookahead import LookAhead  # noqa: E402
from actors.messages import AdvanceCursor, GetTree, MovedHint, PersistEvent, StartHost, StopHost  # noqa: E402
from actors.messages_control import ApplyHostLimits, ForgetAccount, RestartHost, unknown_message  # noqa: E402
from actors.metrics import MOVED_HINTS_DROPPED  # noqa: E402
from actors.outbound import OutboundClient  # noqa: E402
from actors.stack_dump import install_stack_dump  # noqa: E402
from actors.verify import Verifier, VerifyLimits  # noqa: E402
from config.logs import configure_logging  # noqa: E402
from config.settings import Settings, settings_from_json  # noqa: E402
from config.tracing import load_tracing_config  # noqa: E402
from store.db import open_database  # noqa: E402
from store.hosts import banned_domains  # noqa: E402

log = logging.getLogger(__name__)
# a worker sends what it accepted this long after the first event of a batch: at a steady 1,000/s
# 2 ms sent about one event a message (a wake-up on both sides each); 5 ms measured 599 against
# 633 µs of relay CPU per event, for 2.5 ms more p50 (scripts/bench_realistic.py --fixed-rates 1000)
BATCH_SECONDS = 0.005
MAX_MOVED_HINTS = 1024  # wrong_host DIDs waiting for the next send; more are dropped (and counted)


class _Inbox:
    def __init__(self, owner: RemoteSequencer) -> None:
        self._owner = owner

    def qsize(self) -> int:
        return len(self._owner.pending)


class RemoteSequencer:
    """Looks like the sequencer's ActorRef to subscribers: ``tell`` and ``actor_inbox.qsize()``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: list[PersistEvent] = []
        self.cursors: list[AdvanceCursor] = []
        self.moved: dict[str, None] = {}  # wrong_host DIDs for the relay's spider, deduplicated
        self.actor_inbox = _Inbox(self)
        self._armed = gevent.event.Event()  # something waits to be sent
        self._full = gevent.event.Event()  # a whole batch of events waits
        self.closed = gevent.event.Event()
        self._flusher = gevent.spawn(self._run)

    def tell(self, message: Any) -> None:
        if isinstance(message, PersistEvent):
            self.pending.append(message)
            if len(self.pending) >= MAX_BATCH_EVENTS:
                self._full.set()
        elif isinstance(message, AdvanceCursor):
            self.cursors.append(message)
        elif isinstance(message, MovedHint):
            if len(self.moved) < MAX_MOVED_HINTS:
                self.moved[message.did] = None
            else:
                MOVED_HINTS_DROPPED.inc()
        else:
            return
        if not self._armed.is_set():
            self._armed.set()

    def _run(self) -> None:
        """Idle until something is told, then send it all after ``BATCH_SECONDS`` (or at once when a batch is full)."""
        try:
            while True:
                self._armed.wait()
                self._full.wait(BATCH_SECONDS)
                self._armed.clear()  # before the sends: what is told while they block arms the next round
                self._full.clear()
                self.flush()
        except (OSError, LinkClosed):
            self.closed.set()

    def flush(self) -> None:
        # events first, then cursors: a cursor never overtakes the events before it
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH_EVENTS], self.pending[MAX_BATCH_EVENTS:]
            if tracing.ENABLED and (samples := tracing.take_samples(batch)):
                send_message(self.sock, "traces", samples)  # before their events: the relay adopts them first
            send_message(self.sock, "events", encode_events(batch))
        if self.cursors:
            cursors, self.cursors = self.cursors, []
            send_message(self.sock, "cursors", encode_cursors(cursors))
        if self.moved:
            moved, self.moved = list(self.moved), {}
            send_message(self.sock, "moved", moved)


def run(settings: Settings, sock: socket.socket, index: int) -> int:
    configure_logging(settings.log_level, settings.log_format)
    install_stack_dump()
    tracing.setup_sampling_only(load_tracing_config(settings))  # the relay checked the same variables
    db = open_database(settings.effective_database_url())
    retry_policy = RetryPolicy(give_up_after_seconds=settings.infra_retry_seconds)
    directory = IdentityDirectory(
        db,
        plc_url=settings.plc_url,
        allow_insecure_hosts=settings.allow_insecure_hosts,
        ttl_seconds=settings.identity_ttl_seconds,
        outbound=OutboundClient.from_settings(settings),
    )
    accounts = AccountCache(db, retry_policy=retry_policy)
    verifier = Verifier(
        directory,
        accounts,
        VerifyLimits(
            max_ops=settings.max_commit_ops,
            max_rev_future_seconds=settings.max_rev_future_seconds,
            lenient=settings.lenient_sync_validation,
        ),
    )
    remote = RemoteSequencer(sock)
    identity = IdentityResolver.start(directory)
    hosts = HostSupervisor.start(
        db=db,
        verifier=verifier,
        sequencer=remote,
        config=SubscriberConfig.from_settings(settings, lookahead=LookAhead(directory, accounts)),
        default_account_limit=settings.default_host_account_limit,
        default_events_per_second=settings.default_host_events_per_second,
        lenient=settings.lenient_sync_validation,
        offline_retry_seconds=settings.offline_retry_seconds,
        is_banned=lambda hostname: _banned(db, hostname),
        retry_policy=retry_policy,
    )
    watcher = gevent.spawn(_watch, hosts, sock)
    log.info("ingest worker started index=%d", index)
    try:
        while not remote.closed.is_set():
            kind, payload = recv_message(sock)
            if kind == "start_host":
                hosts.tell(StartHost(str(payload)))
            elif kind == "stop_host":
                hosts.tell(StopHost(str(payload[0]), str(payload[1])))
            elif kind == "restart_host":
                hosts.tell(RestartHost(str(payload)))
            elif kind == "host_limits":
                hostname, limit, rate, per_hour, per_day = payload
                hosts.tell(ApplyHostLimits(str(hostname), limit, rate, per_hour, per_day))
            elif kind == "forget_account":
                hosts.tell(ForgetAccount(str(payload)))
            elif kind == "get_tree":
                send_message(sock, "tree", hosts.ask(GetTree(), timeout=5))
            elif kind == "quit":
                break
            else:
                unknown_message("ingest_worker", kind)
    except (OSError, LinkClosed):
        pass
    failed = not hosts.is_alive()
    watcher.kill(block=False)
    log.info("ingest worker stopping index=%d", index)
    for ref in (hosts, identity, *reversed(pykka.ActorRegistry.get_all())):  # then orphans of a failed supervisor
        if ref.is_alive():
            try:
                ref.stop(block=True, timeout=30)  # subscribers tell their final cursors
            except pykka.Timeout:
                log.warning("actor did not stop in time actor=%s", ref.actor_class.__name__)
    try:
        remote.flush()
        sock.shutdown(socket.SHUT_WR)  # the relay reads to the end, then sees EOF
    except (OSError, LinkClosed):
        pass
    return 1 if failed else 0


def _watch(hosts: Any, sock: socket.socket) -> None:
    """End the worker's loop when the host supervisor has failed (its subscribers would be orphans)."""
    while hosts.is_alive():
        gevent.sleep(0.5)
    log.error("host supervisor died: stopping the ingest worker")
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def _banned(db: Any, hostname: str) -> bool:
    with db.connection_context():
        return is_banned(hostname, banned_domains(db))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="skyrelay ingest worker (started by the relay)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    settings = settings_from_json(sys.stdin.readline())
    sock = socket.socket(fileno=args.fd)
    return run(settings, sock, args.index)


if __name__ == "__main__":
    sys.exit(main())
