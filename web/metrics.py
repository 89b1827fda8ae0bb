"""Prometheus ``/metrics``: on the main listener, or on a listener of its own (``metrics_bind``).

With ``metrics_bind`` set (``--metrics-bind HOST:PORT``), ``/metrics`` is served only by a small
separate gevent server (as the reference relay does), so the scrape port can stay private
while the relay's public port does not expose it; every other path there is a 404.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint, Response
from gevent.pywsgi import WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)


def metrics_text(multiprocess: bool) -> bytes:
    """The exposition text; with ingest workers, the sum of what every process recorded."""
    if multiprocess:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def metrics_blueprint(multiprocess: bool) -> Blueprint:
    bp = Blueprint("metrics", __name__)

    @bp.get("/metrics")
    def prometheus() -> Any:
        return Response(metrics_text(multiprocess), mimetype=CONTENT_TYPE_LATEST)

    return bp


def metrics_wsgi(multiprocess: bool) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    """A bare WSGI app: ``GET /metrics``, and an XRPC-style 404 for anything else."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics" and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            body = metrics_text(multiprocess)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return [body]
        body = json.dumps({"error": "NotFound", "message": "only /metrics is served here"}).encode()
        start_response("404 Not Found", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def start_metrics_server(host: str, port: int, *, multiprocess: bool) -> WSGIServer:
    """Start the separate metrics listener (``stop()`` it at shutdown)."""
    server = WSGIServer((host, port), metrics_wsgi(multiprocess), log=None, error_log=log)
    server.start()
    log.info("metrics listening bind=%s:%d", host, server.server_port)
    return server
