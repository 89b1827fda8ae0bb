"""XRPC endpoints of the relay spine: requestCrawl, listHosts, getHostStatus."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from flask import Blueprint, jsonify, request
from prometheus_client import Counter

from actors.crawl import CrawlRefused, CrawlTarget, normalize_hostname, probe_pds
from actors.crawl_check import check_crawl
from actors.messages import StartHost
from actors.outbound import OutboundClient
from actors.relay_reads import HostRow, SyncReads
from web.ratelimit import KeyedRateLimiter
from web.xrpc_errors import XrpcError
from web.xrpc_params import MAX_CURSOR, int_arg, json_body, str_arg

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024
CRAWL_REFUSED = Counter(
    "skyrelay_crawl_requests_refused_total", "requestCrawl calls refused early, by reason", ["reason"]
)
MAX_HOSTNAME_CHARS = 512  # a DNS name has at most 253; room for a scheme, port and slash


def _host_json(row: HostRow, is_idle: Callable[[int], bool]) -> dict[str, Any]:
    status = row.status
    if status == "active" and is_idle(row.id):
        status = "idle"
    return {"hostname": row.hostname, "seq": max(row.last_seq, 0), "accountCount": row.account_count,
            "status": status}  # fmt: skip


def sync_blueprint(
    *,
    db: Any,
    host_supervisor: Any,
    insecure: bool,
    own_hostnames: frozenset[str] = frozenset(),
    outbound: OutboundClient | None = None,
    probe: Callable[[CrawlTarget], Any] | None = None,
    crawl_requests_per_minute: int = 30,
    max_hosts: int = 10_000,
    crawl_gate: Callable[[str], None] | None = None,  # the control plane's on/off switch and daily limit
    is_idle: Callable[[int], bool] = lambda host_id: False,
    reads: SyncReads | None = None,
) -> Blueprint:
    """The sync endpoints; requestCrawl is rate-limited per client address and refuses new hosts past ``max_hosts``.

    ``is_idle(host_id)``: the host is connected but silent (reported with status ``idle``).
    ``reads`` serves listHosts and getHostStatus (by default over ``db``, queries in the thread pool).
    """
    host_reads = reads or SyncReads(db, None)
    bp = Blueprint("xrpc_sync", __name__)
    crawl_limiter = KeyedRateLimiter(crawl_requests_per_minute)
    client = outbound or OutboundClient.for_settings(insecure)
    probe_host = probe or (lambda target: probe_pds(target, client=client))

    @bp.post("/xrpc/com.atproto.sync.requestCrawl")
    def request_crawl() -> Any:
        wait = crawl_limiter.allow(request.remote_addr or "")
        if wait:
            CRAWL_REFUSED.labels("rate_limited").inc()
            seconds = math.ceil(wait)
            raise XrpcError(
                "RateLimitExceeded",
                f"too many crawl requests; retry in {seconds} s",
                status=429,
                headers={"Retry-After": str(seconds)},
            )
        body = json_body(MAX_BODY_BYTES)
        if not isinstance(body, dict):
            raise XrpcError("InvalidRequest", 'body must be JSON {"hostname": ...}')
        try:
            if normalize_hostname(body.get("hostname"), insecure=insecure).hostname in own_hostnames:
                raise CrawlRefused("InvalidRequest", "that is this relay")
            target = check_crawl(db, body.get("hostname"), insecure=insecure, probe=probe_host, gate=crawl_gate,
                                 max_hosts=max_hosts)  # fmt: skip
        except CrawlRefused as exc:
            if exc.error == "HostLimitReached":
                CRAWL_REFUSED.labels("host_limit").inc()
                raise XrpcError(exc.error, exc.message, status=403) from None
            raise XrpcError(exc.error, exc.message) from None
        host_supervisor.tell(StartHost(target.hostname))
        log.info("crawl requested host=%s", target.hostname)
        return jsonify({})

    @bp.get("/xrpc/com.atproto.sync.listHosts")
    def list_hosts_view() -> Any:
        limit = int_arg("limit", default=200, low=1, high=1000)
        cursor = int_arg("cursor", default=0, low=0, high=MAX_CURSOR)
        rows = host_reads.host_page(cursor, limit)
        out: dict[str, Any] = {"hosts": [_host_json(r, is_idle) for r in rows]}
        if len(rows) == limit:
            out["cursor"] = str(rows[-1].id)
        return jsonify(out)

    @bp.get("/xrpc/com.atproto.sync.getHostStatus")
    def get_host_status() -> Any:
        hostname = str_arg("hostname", max_length=MAX_HOSTNAME_CHARS, required=True)
        row = host_reads.host(hostname.strip().lower())
        if row is None:
            raise XrpcError("HostNotFound", "host not known to this relay")
        return jsonify(_host_json(row, is_idle))

    return bp
