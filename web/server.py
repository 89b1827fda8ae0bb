"""Run the relay: lock the data dir, start storage and the actor tree, serve HTTP and websockets, stop in reverse."""

from __future__ import annotations

import gc
import logging
import signal
import sys
from typing import Any

import gevent
import gevent.event
import peewee
from flask import Blueprint

from actors import tracing
from actors.relay_api import Relay
from actors.relay_reads import SyncReads
from actors.spider import Spider, SpiderConfig
from actors.supervisor import RelaySupervisor
from config.logs import configure_logging
from config.settings import Settings, mask_url_password
from config.tracing import TracingConfig
from store.carstore import CarStoreError
from store.data_dir import claim_database, lock_data_dir
from store.db import StoreError, open_database, ping
from store.migrations import apply_migrations
from web.admin_api import admin_blueprint
from web.admin_auth import AdminGuard
from web.admin_pages import admin_pages_blueprint, admin_root_blueprint
from web.app import create_app
from web.exit_guard import ExitGuard, still_alive
from web.firehose import firehose_blueprint, pre_upgrade_hook
from web.httpserver import HttpLimits, RelayWSGIServer
from web.metrics import metrics_blueprint, start_metrics_server
from web.xrpc_repo import repo_blueprint
from web.xrpc_sync import sync_blueprint

log = logging.getLogger(__name__)


class Services:
    """What the web layer needs from the running relay."""

    def __init__(self, settings: Settings, relay: RelaySupervisor) -> None:
        self.settings = settings
        self.relay = relay
        self.db = relay.db
        self.control = Relay(relay)  # every operator operation goes through it
        self.reads = SyncReads(relay.db, relay.carstore)  # the public read API's queries and mirror reads
        self.admin_guard = AdminGuard(  # one guard (and one failure throttle) for the admin API and pages
            settings.admin_passwords(),
            max_failures=settings.admin_auth_max_failures,
            window_seconds=settings.admin_auth_window_seconds,
        )
        if settings.spider_enabled:  # discovery shares the requestCrawl checks through the control plane
            relay.spider = Spider(relay.db, relay.directory, self._spider_check, self.control.subscribe,
                                  SpiderConfig(settings.spider_queue_size, settings.spider_lookups_per_second,
                                               allow_insecure_hosts=settings.allow_insecure_hosts,
                                               recheck_moved_seconds=settings.spider_recheck_moved_seconds),
                                  ).start()  # fmt: skip

    def _spider_check(self, hostname: str) -> None:
        self.control.check_crawl(hostname, public=False, new_host_limit=True)

    def health(self) -> bool:
        return self.reads.healthy()

    def health_details(self) -> dict[str, Any]:
        """Added to the health answer: the newest seq (fan-out nodes read it for their lag metric)."""
        return {"seq": self.relay.event_log.last_seq}

    def blueprints(self) -> list[Blueprint]:
        multiprocess = self.settings.ingest_workers > 0
        metrics = [] if self.settings.metrics_bind else [metrics_blueprint(multiprocess)]
        return [
            firehose_blueprint(
                self.relay.event_log,
                self.relay.registry,
                buffer_frames=self.settings.consumer_buffer_frames,
                buffer_bytes=self.settings.consumer_buffer_bytes,
                max_replays=self.settings.firehose_max_replays,
                ping_seconds=self.settings.firehose_ping_seconds,
            ),
            sync_blueprint(
                db=self.db,
                host_supervisor=self.relay.hosts,
                insecure=self.settings.allow_insecure_hosts,
                crawl_requests_per_minute=self.settings.crawl_requests_per_minute,
                max_hosts=self.settings.max_hosts,
                outbound=self.relay.outbound,
                crawl_gate=self.control.public_crawl_gate,
                is_idle=lambda host_id: self.relay.activity.is_idle(host_id, self.settings.host_idle_status_seconds),
                reads=self.reads,
            ),
            repo_blueprint(reads=self.reads),
            admin_blueprint(relay=self.control, guard=self.admin_guard),
            admin_pages_blueprint(relay=self.control, guard=self.admin_guard, settings=self.settings),
            admin_root_blueprint(),
            *metrics,
        ]


EXIT_REFUSED = 2  # start-up refused: data directory in use, database unusable or from a newer version


def _refuse(reason: str) -> int:
    """One line on stderr (no traceback) and the status a service manager should not retry fast."""
    print(f"skyrelay: {reason}", file=sys.stderr, flush=True)
    return EXIT_REFUSED


def _reachable(url: str) -> peewee.Database:
    """The database at ``url``, connected once; ``StoreError`` with a one-line reason if unusable."""
    db = open_database(url)
    try:
        with db.connection_context():
            ping(db, raise_errors=True)
    except (peewee.DatabaseError, peewee.InterfaceError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreError(f"cannot use database {mask_url_password(url)}: {detail}") from None
    return db


def _start_relay(settings: Settings) -> RelaySupervisor:
    """Open and migrate the databases, recover the event log, start the actor tree."""
    db = _reachable(settings.effective_database_url())
    carstore_db = _reachable(settings.effective_carstore_database_url()) if settings.mirror_enabled else None
    apply_migrations(db)
    claim_database(db, settings.data_dir)
    relay = RelaySupervisor(settings, db, carstore_db)
    try:
        relay.start()
    except BaseException:
        relay.stop()
        raise
    return relay


def serve(settings: Settings, tracing_config: TracingConfig | None = None) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until an essential actor dies (exit 1); 2 if refused at start.

    However it stops, the process is gone within ``shutdown_timeout_seconds`` (``web.exit_guard``).
    """
    configure_logging(settings.log_level, settings.log_format)
    if tracing_config is not None and tracing_config.enabled:
        tracing.setup(tracing_config)
        log.info(
            "tracing on endpoint=%s service=%s sampler=%s events_ratio=%g",
            tracing_config.endpoint,
            tracing_config.service_name,
            tracing_config.sampler,
            tracing_config.events_ratio,
        )
    try:
        lock_data_dir(settings.data_dir)  # before any database is opened; held until the process exits
        relay = _start_relay(settings)
    except (StoreError, CarStoreError) as exc:
        return _refuse(str(exc))
    except (peewee.DatabaseError, peewee.InterfaceError) as exc:  # lost between the check and the migrations
        return _refuse(f"database error at start-up: {(str(exc).strip().splitlines() or [''])[0]}")
    except OSError as exc:  # the data directory or a SQLite file's folder cannot be made or written
        return _refuse(f"cannot use the data directory or a database file: {exc}")
    app = create_app(Services(settings, relay))
    host, port = settings.bind_host_port()
    server = RelayWSGIServer((host, port), app, limits=HttpLimits.from_settings(settings))
    server.pre_start_hook = pre_upgrade_hook
    guard = ExitGuard(settings.shutdown_timeout_seconds)
    stop = gevent.event.Event()

    def on_signal() -> None:
        if guard.armed:
            guard.exit_now("second signal while stopping")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, on_signal)
    server.start()
    metrics_at = settings.metrics_host_port()
    metrics_server = start_metrics_server(*metrics_at, multiprocess=settings.ingest_workers > 0) if metrics_at else None
    gc.freeze()  # long-lived start-up objects out of the cyclic GC's way (see HACKING.md)
    log.info("relay listening bind=%s:%d", host, server.server_port)
    status = relay.wait(stop)
    guard.arm(status)  # from here the process ends within the deadline, whatever hangs
    if status:
        log.error("relay stopping after a fatal error reason=%s", relay.fatal_reason)
    else:
        log.info("relay stopping")
    server.stop(timeout=5)
    if metrics_server is not None:
        metrics_server.stop(timeout=1)
    relay.stop()
    tracing.shutdown()  # exports the spans still pending
    alive = still_alive()
    if alive != "nothing known":
        log.warning("still running after the relay stopped still_alive=%s", alive)
    return status
