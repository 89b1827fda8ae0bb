"""Run a fan-out node: open its event log, start the broadcaster and the upstream subscriber, serve, stop in reverse.

A fan-out node re-serves one relay's firehose with the relay's own seqs, so that nodes behind a
load balancer are interchangeable (see README, "Fan-out nodes"). It uses the relay's event log,
``Broadcaster``, ``ConsumerRegistry``, firehose blueprint and HTTP server unchanged; what is its
own is the upstream subscriber (``actors.fanout_upstream``), the proxy (``web.fanout_proxy``),
its health rule (503 while the upstream has been down longer than
``fanout_unhealthy_after_seconds``) and the consumer limit (503 ``ConsumerLimitReached`` before
the websocket upgrade; concurrent handshakes may pass it by a few).
"""

from __future__ import annotations

import gc
import logging
import signal
from typing import Any

import gevent
import gevent.event
from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from actors.broadcaster import Broadcaster, ConsumerRegistry
from actors.fanout_status import UpstreamStatus, http_base
from actors.fanout_upstream import FanoutConfig, FanoutUpstream
from actors.metrics_fanout import CONSUMERS_REFUSED
from actors.outbound import OutboundClient
from config.logs import configure_logging
from config.settings import Settings
from store.db import open_database, ping
from store.eventlog import EventLog
from store.migrations import apply_migrations
from web.app import create_app
from web.fanout_proxy import fanout_proxy_blueprint
from web.firehose import SUBSCRIBE_REPOS_PATH, firehose_blueprint, pre_upgrade_hook
from web.httpserver import HttpLimits, RelayWSGIServer
from web.xrpc_errors import XrpcError

log = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 0.5
_REFUSED_KEY = "skyrelay.fanout.consumer_limit"


class FanoutServices:
    """What the web layer needs from a running fan-out node."""

    def __init__(self, settings: Settings, db: Any, event_log: EventLog, registry: ConsumerRegistry,
                 status: UpstreamStatus) -> None:  # fmt: skip
        self.settings = settings
        self.db = db
        self.event_log = event_log
        self.registry = registry
        self.status = status

    def health(self) -> bool:
        return self.status.down_for() <= self.settings.fanout_unhealthy_after_seconds and self._database_ok()

    def _database_ok(self) -> bool:
        with self.db.connection_context():
            return ping(self.db)

    def health_details(self) -> dict[str, Any]:
        status = self.status
        return {
            "database": "ok" if self._database_ok() else "unreachable",
            "upstream": "connected" if status.connected else f"down for {status.down_for():.0f} s",
            "seq": self.event_log.last_seq,
            "upstreamSeq": status.upstream_seq,
        }

    def upgrade_hook(self, handler: Any) -> bool:
        """``pre_upgrade_hook`` plus the consumer limit: ``True`` keeps the request plain HTTP."""
        environ = handler.environ
        full = len(self.registry) >= self.settings.fanout_max_consumers
        if full and environ.get("PATH_INFO") == SUBSCRIBE_REPOS_PATH:
            environ[_REFUSED_KEY] = True
            return True
        return pre_upgrade_hook(handler)

    def blueprints(self) -> list[Blueprint]:
        s = self.settings
        limit = Blueprint("fanout_limit", __name__)

        @limit.before_app_request
        def refuse_over_limit() -> None:
            if request.environ.get(_REFUSED_KEY):
                CONSUMERS_REFUSED.inc()
                raise XrpcError(
                    "ConsumerLimitReached",
                    f"this fan-out node serves its maximum of {s.fanout_max_consumers} consumers; try another",
                    503,
                    {"Retry-After": "5"},
                )

        metrics = Blueprint("metrics", __name__)

        @metrics.get("/metrics")
        def prometheus() -> Any:
            return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

        return [
            limit,
            firehose_blueprint(
                self.event_log,
                self.registry,
                buffer_frames=s.consumer_buffer_frames,
                buffer_bytes=s.consumer_buffer_bytes,
                max_replays=s.firehose_max_replays,
                ping_seconds=s.firehose_ping_seconds,
                future_cursor_wait_seconds=s.fanout_future_cursor_wait_seconds,
            ),
            fanout_proxy_blueprint(
                upstream_http=http_base(s.fanout_upstream),
                timeout_seconds=s.fanout_proxy_timeout_seconds,
                max_body_bytes=s.fanout_proxy_max_body_bytes,
                crawl_requests_per_minute=s.crawl_requests_per_minute,
            ),
            metrics,
        ]


def serve_fanout(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the upstream subscriber or broadcaster dies (exit 1)."""
    configure_logging(settings.log_level, settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(settings.effective_database_url())
    apply_migrations(db)
    event_log = EventLog(settings.data_dir / "events", db, retention_seconds=settings.replay_window_hours * 3600)
    info = event_log.open(checkpoint_seq=2**62)  # nothing to re-apply: the tail is not needed
    if info.truncated_bytes:
        log.warning("event log torn tail removed bytes=%d", info.truncated_bytes)
    registry = ConsumerRegistry()
    status = UpstreamStatus()
    broadcaster = Broadcaster.start(registry)
    config = FanoutConfig(
        upstream=settings.fanout_upstream,
        max_frame_bytes=settings.max_frame_bytes,
        idle_timeout_seconds=settings.upstream_idle_timeout_seconds,
        poll_seconds=settings.fanout_upstream_poll_seconds,
    )
    upstream = FanoutUpstream.start(event_log, broadcaster, config, status, OutboundClient.from_settings(settings))
    services = FanoutServices(settings, db, event_log, registry, status)
    app = create_app(services)
    host, port = settings.bind_host_port()
    server = RelayWSGIServer((host, port), app, limits=HttpLimits.from_settings(settings))
    server.pre_start_hook = services.upgrade_hook
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    server.start()
    gc.freeze()
    log.info(
        "fanout node listening bind=%s:%d upstream=%s first_seq=%d last_seq=%d",
        host,
        server.server_port,
        settings.fanout_upstream,
        event_log.first_seq,
        event_log.last_seq,
    )
    status_code = 0
    while not stop.wait(WATCH_INTERVAL_SECONDS):
        if not (upstream.is_alive() and broadcaster.is_alive()):
            log.error("fanout node stopping: an essential actor died")
            status_code = 1
            break
    log.info("fanout node stopping")
    server.stop(timeout=5)
    for consumer in registry.consumers():
        registry.unregister(consumer)
    for ref in (upstream, broadcaster):
        if ref.is_alive():
            ref.stop(timeout=15)
    event_log.close()
    return status_code
