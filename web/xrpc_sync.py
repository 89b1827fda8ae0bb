"""XRPC endpoints of the relay spine: requestCrawl, listHosts, getHostStatus."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, jsonify, request

from actors.crawl import CrawlRefused, check_addresses, is_banned, normalize_hostname, probe_pds
from actors.messages import StartHost
from store.hosts import HostRow, banned_domains, get_host, list_hosts
from web.xrpc_errors import XrpcError

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024


def _host_json(row: HostRow, connected: bool | None = None) -> dict[str, Any]:
    status = row.status
    if status == "active" and connected is False:
        status = "idle"
    return {"hostname": row.hostname, "seq": max(row.last_seq, 0), "accountCount": row.account_count,
            "status": status}  # fmt: skip


def sync_blueprint(
    *,
    db: Any,
    host_supervisor: Any,
    insecure: bool,
    own_hostnames: frozenset[str] = frozenset(),
    probe: Callable[..., Any] = probe_pds,
    crawl_gate: Callable[[str], None] | None = None,  # the control plane's on/off switch and daily limit
) -> Blueprint:
    bp = Blueprint("xrpc_sync", __name__)

    @bp.post("/xrpc/com.atproto.sync.requestCrawl")
    def request_crawl() -> Any:
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise XrpcError("InvalidRequest", "request body too large")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise XrpcError("InvalidRequest", 'body must be JSON {"hostname": ...}')
        try:
            target = normalize_hostname(body.get("hostname"), insecure=insecure)
            if target.hostname in own_hostnames:
                raise CrawlRefused("InvalidRequest", "that is this relay")
            with db.connection_context():
                bans = banned_domains(db)
                existing = get_host(db, target.hostname)
            if is_banned(target.hostname, bans) or (existing and existing.status == "banned"):
                raise CrawlRefused("HostBanned", "this host is banned from the relay")
            if crawl_gate is not None:
                crawl_gate(target.hostname)
            check_addresses(target, insecure=insecure)
            probe(target)
        except CrawlRefused as exc:
            raise XrpcError(exc.error, exc.message) from None
        host_supervisor.tell(StartHost(target.hostname))
        log.info("crawl requested host=%s", target.hostname)
        return jsonify({})

    @bp.get("/xrpc/com.atproto.sync.listHosts")
    def list_hosts_view() -> Any:
        limit = _int_arg("limit", 200, 1, 1000)
        cursor = _int_arg("cursor", 0, 0, 2**62)
        with db.connection_context():
            rows = list_hosts(db, after_id=cursor, limit=limit)
        out: dict[str, Any] = {"hosts": [_host_json(r) for r in rows]}
        if len(rows) == limit:
            out["cursor"] = str(rows[-1].id)
        return jsonify(out)

    @bp.get("/xrpc/com.atproto.sync.getHostStatus")
    def get_host_status() -> Any:
        hostname = request.args.get("hostname", "")
        if not hostname:
            raise XrpcError("InvalidRequest", "hostname is required")
        with db.connection_context():
            row = get_host(db, hostname.strip().lower())
        if row is None:
            raise XrpcError("HostNotFound", "host not known to this relay")
        return jsonify(_host_json(row))

    return bp


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise XrpcError("InvalidRequest", f"{name} must be an integer from {low} to {high}")
    return int(raw)
