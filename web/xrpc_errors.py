"""XRPC error bodies: ``{"error": Name, "message": ...}`` with a 4xx/5xx status."""

from __future__ import annotations

from flask import Response, jsonify


class XrpcError(Exception):
    """Raised by a handler to answer with an XRPC error (a client error unless status >= 500)."""

    def __init__(self, error: str, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.status = status
        self.headers = headers or {}


def xrpc_error_response(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> tuple[Response, int]:
    response = jsonify({"error": error, "message": message})
    response.headers.update(headers or {})
    return response, status
