"""Operator API (HTTP basic auth as ``admin`` with ``admin_password``): repo re-sync requests.

Disabled (404) when no admin password is configured. More operator actions (bans, limits,
takedowns, the actor tree) belong here as they are built.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, jsonify, request

from actors import tracing
from actors.messages_mirror import RequestResync
from protocol.syntax import is_valid_did
from web.xrpc_errors import XrpcError

log = logging.getLogger(__name__)


def admin_blueprint(*, password: str, mirror: Any, tree: Callable[[], Any] | None = None) -> Blueprint:
    bp = Blueprint("admin_api", __name__)

    @bp.before_request
    def _auth() -> None:
        if not password:
            raise XrpcError("NotFound", "the admin API is disabled (no admin password set)", 404)
        auth = request.authorization
        given = auth.password if auth is not None and auth.username == "admin" else None
        if given is None or not hmac.compare_digest(given.encode(), password.encode()):
            raise XrpcError("AuthRequired", "admin credentials required", 401)

    @bp.post("/admin/repo/resync")
    @tracing.traced("admin.repo_resync")
    def resync() -> Any:
        body = request.get_json(silent=True)
        did = body.get("did") if isinstance(body, dict) else None
        if not isinstance(did, str) or not is_valid_did(did):
            raise XrpcError("InvalidRequest", 'body must be JSON {"did": "<a valid DID>"}')
        if mirror is None:
            raise XrpcError("MethodNotImplemented", "the repo mirror is disabled", 501)
        mirror.tell(RequestResync(did, "admin"))
        log.info("admin requested resync did=%s", did)
        return jsonify({"did": did, "queued": True})

    @bp.get("/admin/tree")
    @tracing.traced("admin.tree")
    def actor_tree() -> Any:
        if tree is None:
            raise XrpcError("MethodNotImplemented", "no actor tree available", 501)
        return jsonify(tree())

    return bp
