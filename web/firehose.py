"""The relay's output firehose: ``GET /xrpc/com.atproto.sync.subscribeRepos?cursor=N`` over a websocket.

Behaviour, per the atproto event-stream spec:

- no cursor: live events only, from the moment of connection;
- a cursor that is not a non-negative integer: HTTP 400 ``InvalidRequest`` before any upgrade
  (this needs ``pre_upgrade_hook`` installed on the server; see its docstring);
- cursor > the log's last seq: error frame ``FutureCursor``, then close;
- cursor older than retention (``cursor < first_seq - 1``): ``#info`` ``OutdatedCursor``, then
  replay from the oldest retained event;
- replay, then live, with no gap and no duplicate: the connection replays the log without
  buffering, registers for live frames, replays the log again until it is exhausted, then sends
  the buffered live frames whose seq is above the last one sent. Events are durable in the log
  before they are broadcast, so every event is in the log or in the buffer.
- a consumer whose buffer overflows (in frames or in bytes) is cut by the broadcaster: error
  frame ``ConsumerTooSlow``, then close. A socket that accepts nothing for ``send_stall_seconds``
  is shut down.
- at most ``max_replays`` connections replay from a cursor at once; later ones wait their turn
  (connected, sent nothing yet) in arrival order. A replay yields to other greenlets after every
  write, so ``_health`` and live consumers keep being served while it runs.
- a consumer sent nothing for ``ping_seconds`` is pinged; one that answers nothing (no pong, no
  frame at all) for ``ping_seconds`` after a ping is cut (reason ``ping_timeout``) and closed.

Each connection is a ``web.firehose_connection.Connection``: one writer greenlet and one reader.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qs

from flask import Blueprint, Response, jsonify, request

from actors.broadcaster import DEFAULT_BUFFER_BYTES, ConsumerRegistry
from protocol.frames import error_frame
from web.firehose_connection import Connection, ConnectionLimits, EventLogReader, ReplaySlots
from web.xrpc_errors import XrpcError
from web.xrpc_params import cursor_values

__all__ = ["SUBSCRIBE_REPOS_PATH", "EventLogReader", "firehose_blueprint", "parse_cursor", "pre_upgrade_hook"]

SUBSCRIBE_REPOS_PATH = "/xrpc/com.atproto.sync.subscribeRepos"


def parse_cursor(values: list[str]) -> int | None:
    """The ``cursor`` query values as a seq (``None`` when absent); raises ``XrpcError`` if malformed."""
    return cursor_values("cursor", values, empty_ok=False)


def _handshake_complete(environ: dict[str, Any]) -> bool:
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") not in ("13", "8", "7"):
        return False
    try:
        return len(base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)) == 16
    except ValueError:
        return False


def pre_upgrade_hook(handler: Any) -> bool:
    """gevent-websocket ``pre_start_hook``: ``True`` keeps a bad firehose request plain HTTP.

    gevent-websocket's ``WebSocketHandler`` answers 101 before the application runs, so a
    malformed cursor (or an incomplete handshake, which it would answer in plain text) must be
    caught here; the request then reaches the view without a websocket and gets a 400 XRPC body.
    Every other path (and HTTP/1.0) stays plain HTTP too. ``web.httpserver.RelayWSGIServer``
    installs it; on a plain ``WSGIServer`` set ``server.pre_start_hook = pre_upgrade_hook``.
    """
    environ = handler.environ
    if environ.get("PATH_INFO") != SUBSCRIBE_REPOS_PATH or environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return True  # only the firehose is a websocket (gevent-websocket would answer the rest in plain text)
    try:
        parse_cursor(parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get("cursor", []))
    except XrpcError:
        return True
    return environ.get("HTTP_UPGRADE", "").lower() == "websocket" and not _handshake_complete(environ)


def firehose_blueprint(
    log_reader: EventLogReader,
    registry: ConsumerRegistry,
    *,
    buffer_frames: int,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    send_stall_seconds: float = 30.0,
    max_client_frame_bytes: int = 4096,
    max_replays: int = 8,
    ping_seconds: float = 30.0,
    future_cursor_wait_seconds: float = 0.0,
) -> Blueprint:
    """The subscribeRepos websocket route, reading ``log_reader`` and registering in ``registry``.

    ``buffer_frames`` and ``buffer_bytes`` bound each consumer's queue of live frames;
    ``send_stall_seconds`` is how long a socket may accept no bytes before the connection is
    dropped; ``max_client_frame_bytes`` caps any frame a client sends (the relay expects none but
    pings and close); ``max_replays`` replays run at once; ``ping_seconds`` is the keep-alive;
    a cursor ahead of the log waits up to ``future_cursor_wait_seconds`` for it before
    ``FutureCursor`` (0 for the relay, whose log is the source; a fan-out node may be behind a peer).
    """
    limits = ConnectionLimits(buffer_frames, buffer_bytes, send_stall_seconds, max_client_frame_bytes, ping_seconds,
                              future_cursor_wait_seconds)  # fmt: skip
    slots = ReplaySlots(max_replays)
    blueprint = Blueprint("firehose", __name__)

    @blueprint.route(SUBSCRIBE_REPOS_PATH, websocket=True)
    def subscribe_repos() -> Any:
        ws = request.environ.get("wsgi.websocket")
        if ws is None:
            parse_cursor(request.args.getlist("cursor"))
            raise XrpcError(
                "InvalidRequest", "incomplete websocket handshake: Sec-WebSocket-Key and Sec-WebSocket-Version required"
            )
        try:
            cursor = parse_cursor(request.args.getlist("cursor"))
        except XrpcError as exc:  # already upgraded: the server runs without pre_upgrade_hook
            ws.send(error_frame(exc.error, exc.message))
            ws.close()
            return ""
        user_agent = request.headers.get("User-Agent", "")[:200]
        Connection(ws, log_reader, registry, request.remote_addr or "", limits, slots, user_agent).serve(cursor)
        return ""

    @blueprint.get(SUBSCRIBE_REPOS_PATH)
    def subscribe_repos_plain() -> Any:
        parse_cursor(request.args.getlist("cursor"))
        body = {"error": "InvalidRequest", "message": "subscribeRepos is a websocket endpoint: upgrade required"}
        response: Response = jsonify(body)
        response.status_code = 426
        response.headers["Upgrade"] = "websocket"
        return response

    return blueprint
