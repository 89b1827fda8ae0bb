"""The admin JSON API under ``/admin/``: HTTP in and out around ``actors.relay_api.Relay``, nothing else.

Paths, parameters and JSON field names follow the reference relay's admin API where it has the
same operation (parameters in the query string or, equally, in a JSON body); skyrelay's own
operations sit beside them. Every answer is JSON; a refused request is an XRPC error
``{"error", "message"}`` with a 4xx status and changes nothing. Off (404) without a password;
authentication and its throttle: ``web.admin_auth``. Routes are listed in README.md.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context

from actors import tracing
from actors.control_errors import ControlError
from web.admin_auth import AdminAuthError, AdminGuard
from web.xrpc_errors import XrpcError, xrpc_error_response

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
_TRUE = {"1", "t", "true"}
_FALSE = {"0", "f", "false"}
OK = {"success": "true"}


def _body() -> dict[str, Any]:
    """The JSON object body ({} when there is none); read at most MAX_BODY_BYTES, chunked or not."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise XrpcError("PayloadTooLarge", "request body too large", 413)
    cached = getattr(request, "_admin_body", None)
    if cached is not None:
        return dict(cached)
    data = request.stream.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise XrpcError("PayloadTooLarge", "request body too large", 413)
    body: Any = {}
    if data.strip():
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise XrpcError("InvalidRequest", "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise XrpcError("InvalidRequest", "body must be a JSON object")
    request._admin_body = body  # type: ignore[attr-defined]
    return dict(body)


def _param(*names: str) -> Any:
    """A parameter from the query string or the JSON body (the first name found)."""
    for name in names:
        if name in request.args:
            return request.args[name]
    body = _body()
    for name in names:
        if name in body:
            return body[name]
    return None


def _bool(name: str) -> bool:
    raw = _param(name)
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if raw is not None else ""
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise XrpcError("InvalidRequest", f"{name} must be true or false")


def _int(name: str, *, default: int | None = None) -> int:
    raw = _param(name)
    if raw is None and default is not None:
        return default
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 18:
        return int(raw)
    raise XrpcError("InvalidRequest", f"{name} must be a non-negative integer")


def _number(name: str) -> Any:
    """An optional number: JSON numbers pass as they are, query strings are parsed; the Relay checks ranges."""
    raw = _param(name)
    if isinstance(raw, str):
        try:
            return float(raw) if "." in raw else int(raw)
        except ValueError:
            raise XrpcError("InvalidRequest", f"{name} must be a number") from None
    return raw


def admin_blueprint(*, relay: Any, guard: AdminGuard) -> Blueprint:
    bp = Blueprint("admin_api", __name__)

    @bp.before_request
    def _auth() -> None:
        if not guard.enabled:
            raise XrpcError("NotFound", "the admin API is disabled (no admin password set)", 404)
        guard.check(request.remote_addr or "", request.headers.get("Authorization"))

    @bp.errorhandler(AdminAuthError)
    def _refused(exc: AdminAuthError) -> Any:
        resp, status = xrpc_error_response(exc.status, exc.error, exc.message)
        resp.headers.update(exc.headers)
        return resp, status

    @bp.errorhandler(ControlError)
    def _control(exc: ControlError) -> Any:
        return xrpc_error_response(exc.status, exc.error, exc.message)

    # -- subscriptions and crawling (reference paths) -----------------------------------------
    @bp.get("/admin/subs/getUpstreamConns")
    def upstream_conns() -> Any:
        return jsonify(relay.upstream_conns())

    @bp.post("/admin/subs/killUpstream")
    @tracing.traced("admin.kill_upstream")
    def kill_upstream() -> Any:
        block = _bool("block") if _param("block") is not None else False
        relay.kill_upstream(_param("host"), block=block)
        return jsonify(OK)

    @bp.get("/admin/subs/getEnabled")
    def get_enabled() -> Any:
        return jsonify({"enabled": relay.crawl_enabled()})

    @bp.post("/admin/subs/setEnabled")
    @tracing.traced("admin.set_enabled")
    def set_enabled() -> Any:
        relay.set_crawl_enabled(_bool("enabled"))
        return jsonify(OK)

    @bp.get("/admin/subs/perDayLimit")
    def per_day_limit() -> Any:
        return jsonify({"limit": relay.per_day_limit()})

    @bp.post("/admin/subs/setPerDayLimit")
    @tracing.traced("admin.set_per_day_limit")
    def set_per_day_limit() -> Any:
        relay.set_per_day_limit(_int("limit"))
        return jsonify(OK)

    @bp.get("/admin/subs/listDomainBans")
    def list_domain_bans() -> Any:
        return jsonify({"banned_domains": relay.list_domain_bans()})

    @bp.post("/admin/subs/banDomain")
    @tracing.traced("admin.ban_domain")
    def ban_domain() -> Any:
        stopped = relay.ban_domain(_param("domain", "Domain"))
        return jsonify({**OK, "hosts_disconnected": stopped})

    @bp.post("/admin/subs/unbanDomain")
    @tracing.traced("admin.unban_domain")
    def unban_domain() -> Any:
        relay.unban_domain(_param("domain", "Domain"))
        return jsonify(OK)

    @bp.get("/admin/subs/trustedDomains")
    def trusted_domains() -> Any:
        return jsonify({"trusted_domains": relay.trusted_domains()})

    @bp.post("/admin/subs/setTrustedDomains")
    @tracing.traced("admin.set_trusted_domains")
    def set_trusted_domains() -> Any:
        domains = _param("domains")
        if not isinstance(domains, list):
            raise XrpcError("InvalidRequest", 'body must be JSON {"domains": [...]}')
        return jsonify({**OK, "trusted_domains": relay.set_trusted_domains(domains)})

    # -- accounts and repos ------------------------------------------------------------------
    @bp.post("/admin/repo/takeDown")
    @tracing.traced("admin.take_down")
    def take_down() -> Any:
        return jsonify({**OK, "seq": relay.take_down(_param("did"))})

    @bp.post("/admin/repo/reverseTakedown")
    @tracing.traced("admin.reverse_takedown")
    def reverse_takedown() -> Any:
        return jsonify({**OK, "seq": relay.reverse_takedown(_param("did"))})

    @bp.get("/admin/repo/takedowns")
    def takedowns() -> Any:
        dids, cursor = relay.list_takedowns(_int("cursor", default=0))
        out: dict[str, Any] = {"dids": dids}
        if cursor:
            out["cursor"] = cursor
        return jsonify(out)

    @bp.post("/admin/repo/compact")
    @tracing.traced("admin.compact")
    def compact() -> Any:
        return jsonify({**OK, "stats": relay.compact(_param("did"))})

    @bp.post("/admin/repo/reset")
    @tracing.traced("admin.reset")
    def reset() -> Any:
        relay.reset(_param("did"))
        return jsonify(OK)

    @bp.post("/admin/repo/verify")
    @tracing.traced("admin.verify")
    def verify() -> Any:
        result = relay.verify(_param("did"))
        return jsonify({**result, "success": "true" if result["success"] else "false"})

    @bp.post("/admin/repo/resync")
    @tracing.traced("admin.repo_resync")
    def resync() -> Any:
        did = _param("did")
        relay.resync(did)
        return jsonify({"did": did, "queued": True})

    # -- hosts -------------------------------------------------------------------------------
    @bp.get("/admin/pds/list")
    def list_hosts() -> Any:
        return jsonify(relay.list_hosts())

    @bp.post("/admin/pds/requestCrawl")
    @tracing.traced("admin.request_crawl")
    def request_crawl() -> Any:
        return jsonify({**OK, "hostname": relay.request_crawl(_param("hostname"), admin=True)})

    @bp.post("/admin/pds/changeLimits")
    @tracing.traced("admin.change_limits")
    def change_limits() -> Any:
        limits = relay.change_limits(_param("host"), repo_limit=_number("repo_limit"), per_second=_number("per_second"),
                                     per_hour=_number("per_hour"), per_day=_number("per_day"))  # fmt: skip
        return jsonify({**OK, **limits})

    @bp.post("/admin/pds/block")
    @tracing.traced("admin.block")
    def block() -> Any:
        relay.block_host(_param("host"))
        return jsonify(OK)

    @bp.post("/admin/pds/unblock")
    @tracing.traced("admin.unblock")
    def unblock() -> Any:
        relay.unblock_host(_param("host"))
        return jsonify(OK)

    @bp.post("/admin/pds/resync")
    @tracing.traced("admin.resync_host")
    def resync_host() -> Any:
        return jsonify({**OK, "queued": relay.resync_host(_param("host"))})

    # -- DID lists (actors.relay_imports) ------------------------------------------------------
    @bp.get("/admin/dids/export")
    def export_dids() -> Any:
        lines = relay.export_dids(host=request.args.get("host"), status=request.args.get("status"))
        return Response(stream_with_context(lines), mimetype="application/x-ndjson")

    @bp.get("/admin/dids/import")
    def import_status() -> Any:
        return jsonify(relay.import_status(request.args.get("job")))

    @bp.post("/admin/dids/import")
    @tracing.traced("admin.import_chunk")
    def import_chunk() -> Any:
        """A chunk of an uploaded DID list (NDJSON body), its first line's number in ``first_line``."""
        first = request.args.get("first_line", "1")
        if not first.isdigit() or len(first) > 12:
            raise XrpcError("InvalidRequest", "first_line must be a line number")
        final = request.args.get("final", "false") in ("1", "true")
        return jsonify(relay.import_chunk(request.args.get("job"), int(first), request.get_data(), final=final))

    # -- consumers and actors ------------------------------------------------------------------
    @bp.get("/admin/consumers/list")
    def consumers() -> Any:
        return jsonify(relay.consumers())

    @bp.get("/admin/tree")
    @tracing.traced("admin.tree")
    def tree() -> Any:
        return jsonify(relay.tree())

    @bp.post("/admin/actors/restart")
    @tracing.traced("admin.restart_actor")
    def restart_actor() -> Any:
        return jsonify({**OK, "name": relay.restart_actor(_param("name"))})

    return bp
