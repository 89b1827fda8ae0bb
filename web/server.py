"""Run the relay: start storage and the actor tree, serve HTTP and websockets, stop in reverse."""

from __future__ import annotations

import gc
import logging
import signal
from typing import Any

import gevent
import gevent.event
from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from actors.supervisor import RelaySupervisor
from config.logs import configure_logging
from config.settings import Settings
from store.db import open_database, ping
from store.migrations import apply_migrations
from web.admin_api import admin_blueprint
from web.app import create_app
from web.firehose import firehose_blueprint, pre_upgrade_hook
from web.httpserver import HttpLimits, RelayWSGIServer
from web.xrpc_repo import repo_blueprint
from web.xrpc_sync import sync_blueprint

log = logging.getLogger(__name__)


class Services:
    """What the web layer needs from the running relay."""

    def __init__(self, settings: Settings, relay: RelaySupervisor) -> None:
        self.settings = settings
        self.relay = relay
        self.db = relay.db

    def health(self) -> bool:
        with self.db.connection_context():
            return ping(self.db)

    def health_details(self) -> dict[str, Any]:
        """Added to the health answer: the newest seq (fan-out nodes read it for their lag metric)."""
        return {"seq": self.relay.event_log.last_seq}

    def blueprints(self) -> list[Blueprint]:
        metrics = Blueprint("metrics", __name__)

        multiprocess = self.settings.ingest_workers > 0

        @metrics.get("/metrics")
        def prometheus() -> Any:
            if multiprocess:  # sum what the relay and its ingest workers recorded
                registry = CollectorRegistry()
                MultiProcessCollector(registry)
                return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
            return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

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
            ),
            repo_blueprint(db=self.db, carstore=self.relay.carstore),
            admin_blueprint(
                password=self.settings.admin_password.reveal(),
                mirror=self.relay.mirror if self.relay.carstore is not None else None,
                tree=self.relay.tree,
            ),
            metrics,
        ]


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until an essential actor dies (exit 1)."""
    configure_logging(settings.log_level, settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(settings.effective_database_url())
    apply_migrations(db)
    relay = RelaySupervisor(settings, db)
    relay.start()
    app = create_app(Services(settings, relay))
    host, port = settings.bind_host_port()
    server = RelayWSGIServer((host, port), app, limits=HttpLimits.from_settings(settings))
    server.pre_start_hook = pre_upgrade_hook
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    server.start()
    gc.freeze()  # long-lived start-up objects out of the cyclic GC's way (see HACKING.md)
    log.info("relay listening bind=%s:%d", host, server.server_port)
    status = relay.wait(stop)
    if status:
        log.error("relay stopping after a fatal error reason=%s", relay.fatal_reason)
    else:
        log.info("relay stopping")
    server.stop(timeout=5)
    relay.stop()
    return status
