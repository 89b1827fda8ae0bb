"""Run the relay: start storage and the actor tree, serve HTTP and websockets, stop in reverse."""

from __future__ import annotations

import logging
import signal
from typing import Any

import gevent
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler

from config.logs import configure_logging
from config.settings import Settings
from store.db import open_database, ping
from store.migrations import apply_migrations
from web.app import create_app

log = logging.getLogger(__name__)


class Services:
    """What the web layer needs from the running relay."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = open_database(settings.effective_database_url())

    def health(self) -> bool:
        return ping(self.db)

    def blueprints(self) -> list[Any]:
        return []


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings)
    apply_migrations(services.db)
    app = create_app(services)
    host, port = settings.bind_host_port()
    server = WSGIServer((host, port), app, handler_class=WebSocketHandler, log=None)
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    server.start()
    log.info("relay listening bind=%s:%d", host, server.server_port)
    stop.wait()
    log.info("relay stopping")
    server.stop(timeout=5)
    return 0
