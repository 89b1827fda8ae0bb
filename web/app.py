"""Flask application factory: XRPC, firehose, admin and metrics blueprints on one app."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from web.tracing import install_request_tracing
from web.xrpc_errors import XrpcError, xrpc_error_response

_HTTP_ERROR_NAMES = {
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    413: "PayloadTooLarge",
    429: "RateLimitExceeded",
    503: "ServiceUnavailable",
}


def create_app(services: Any) -> Flask:
    """Build the app around ``services`` (the running relay's handles: db, actors, settings)."""
    app = Flask("skyrelay")
    app.config["services"] = services
    install_request_tracing(app)

    @app.errorhandler(XrpcError)
    def _xrpc_error(exc: XrpcError) -> Any:
        return xrpc_error_response(exc.status, exc.error, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        name = _HTTP_ERROR_NAMES.get(exc.code or 0, "InvalidRequest")
        return xrpc_error_response(exc.code or 400, name, exc.description or name)

    @app.errorhandler(UnicodeDecodeError)
    def _bad_encoding(exc: UnicodeDecodeError) -> Any:  # raw non-UTF-8 bytes in a query string
        return xrpc_error_response(400, "InvalidRequest", "request parameters must be UTF-8")

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> Any:
        app.logger.exception("unhandled error in request")
        return xrpc_error_response(500, "InternalServerError", "internal server error")

    @app.get("/xrpc/_health")
    @app.get("/_health")
    def health() -> Any:
        ok = services.health()
        body = {"version": "skyrelay 0.1.0", "database": "ok" if ok else "unreachable"}
        details = getattr(services, "health_details", None)
        if details is not None:  # e.g. the newest seq, which fan-out nodes read for their lag
            body.update(details())
        return jsonify(body), (200 if ok else 503)

    @app.get("/")
    def root() -> Any:
        return (
            "skyrelay: an atproto relay. Firehose at /xrpc/com.atproto.sync.subscribeRepos\n",
            200,
            {"Content-Type": "text/plain; charset=utf-8"},
        )

    for blueprint in getattr(services, "blueprints", lambda: [])():
        app.register_blueprint(blueprint)
    return app
