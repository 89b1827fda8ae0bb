"""A fan-out node's XRPC besides the firehose: requestCrawl forwarded, sync reads proxied, the rest 501.

- ``POST requestCrawl``: rate-limited per client address like the relay's, then POSTed to the
  upstream with the same JSON body (at most 16 KiB, re-encoded once parsed); the upstream's
  status and JSON answer come back.
- ``GET`` listHosts, getHostStatus, getRepo, getRecord, getLatestCommit, getBlocks, listRepos,
  getRepoStatus: sent upstream with the same query string; the answer's status, content type
  and body are streamed back. A body declared over ``max_body_bytes`` is refused (502
  ``UpstreamResponseTooLarge``); an undeclared one is cut there (the connection closes early).
- an upstream that cannot be reached or times out: 502 ``UpstreamFailure``.
- any other ``/xrpc/`` method: 501 ``MethodNotImplemented``.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request
from prometheus_client import Counter

from web.ratelimit import KeyedRateLimiter
from web.xrpc_errors import XrpcError
from web.xrpc_params import json_body

log = logging.getLogger(__name__)

CRAWL_BODY_BYTES = 16 * 1024
ERROR_BODY_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024
PROXIED = (
    "com.atproto.sync.listHosts",
    "com.atproto.sync.getHostStatus",
    "com.atproto.sync.getRepo",
    "com.atproto.sync.getRecord",
    "com.atproto.sync.getLatestCommit",
    "com.atproto.sync.getBlocks",
    "com.atproto.sync.listRepos",
    "com.atproto.sync.getRepoStatus",
)
PROXY_REQUESTS = Counter(
    "skyrelay_fanout_proxy_requests_total", "Requests a fan-out node passed to its upstream, by outcome", ["outcome"]
)


def fanout_proxy_blueprint(
    *, upstream_http: str, timeout_seconds: float, max_body_bytes: int, crawl_requests_per_minute: int
) -> Blueprint:
    """The proxied endpoints, sending to ``upstream_http`` (``http(s)://host[:port]``)."""
    bp = Blueprint("fanout_proxy", __name__)
    crawl_limiter = KeyedRateLimiter(crawl_requests_per_minute)

    @bp.post("/xrpc/com.atproto.sync.requestCrawl")
    def request_crawl() -> Any:
        wait = crawl_limiter.allow(request.remote_addr or "")
        if wait:
            seconds = math.ceil(wait)
            message = f"too many crawl requests; retry in {seconds} s"
            raise XrpcError("RateLimitExceeded", message, 429, {"Retry-After": str(seconds)})
        parsed = json_body(CRAWL_BODY_BYTES)  # bounded and well-formed before it goes anywhere
        if not isinstance(parsed, dict):
            raise XrpcError("InvalidRequest", 'body must be JSON {"hostname": ...}')
        body = json.dumps(parsed).encode()
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(f"{upstream_http}{request.path}", data=body, headers=headers, method="POST")
        status, answer, content_type = _call(req, timeout_seconds)
        PROXY_REQUESTS.labels("forwarded").inc()
        return Response(answer.read(ERROR_BODY_BYTES), status=status, content_type=content_type)

    def proxy() -> Any:
        url = f"{upstream_http}{request.path}"
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        status, answer, content_type = _call(urllib.request.Request(url), timeout_seconds)
        declared = answer.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            answer.close()
            PROXY_REQUESTS.labels("too_large").inc()
            raise XrpcError("UpstreamResponseTooLarge", f"the upstream's answer is over {max_body_bytes} bytes", 502)
        PROXY_REQUESTS.labels("proxied").inc()
        response = Response(_stream(answer, max_body_bytes, request.path), status=status, content_type=content_type)
        if declared is not None and declared.isdigit():
            response.headers["Content-Length"] = declared
        return response

    for nsid in PROXIED:
        bp.add_url_rule(f"/xrpc/{nsid}", f"proxy_{nsid.rsplit('.', 1)[1]}", proxy, methods=["GET"])

    @bp.route("/xrpc/<path:nsid>", methods=["GET", "POST"])
    def not_implemented(nsid: str) -> Any:
        raise XrpcError("MethodNotImplemented", f"{nsid[:100]} is not served by a fan-out node", 501)

    return bp


def _call(req: urllib.request.Request, timeout: float) -> tuple[int, Any, str]:
    """Send ``req``; (status, readable answer, content type). Upstream errors pass through; failures are 502."""
    try:
        answer: Any = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        answer = exc
    except (OSError, ValueError) as exc:
        PROXY_REQUESTS.labels("upstream_failure").inc()
        log.info("fanout proxy upstream failed url=%s error=%s", req.full_url, exc)
        raise XrpcError("UpstreamFailure", "the upstream relay did not answer", 502) from None
    return int(answer.status), answer, answer.headers.get("Content-Type", "application/json")


def _stream(answer: Any, max_body_bytes: int, path: str) -> Iterator[bytes]:
    """The answer's body in chunks; one over the limit, or broken off upstream, ends with a reset.

    Not a clean end: the client would take a truncated body for a whole one. gevent closes the
    connection without the final chunk on ``ECONNRESET`` and logs nothing.
    """
    sent = 0
    try:
        while True:
            try:
                chunk = answer.read(CHUNK_BYTES)
            except OSError as exc:
                log.info("fanout proxy answer broke off path=%s error=%s", path, exc)
                raise ConnectionResetError(errno.ECONNRESET, "upstream answer broke off") from None
            if not chunk:
                return
            sent += len(chunk)
            if sent > max_body_bytes:
                PROXY_REQUESTS.labels("cut").inc()
                log.info("fanout proxy answer cut path=%s limit=%d", path, max_body_bytes)
                raise ConnectionResetError(errno.ECONNRESET, "proxied answer over the size limit")
            yield chunk
    finally:
        answer.close()
