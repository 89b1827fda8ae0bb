"""The relay's HTTP server: gevent's WSGI server with timeouts, a connection cap, size limits and XRPC JSON errors.

What it adds to ``gevent.pywsgi`` and ``geventwebsocket`` (all limits in ``HttpLimits``):

- **Timeouts.** A new connection has ``header_timeout_seconds`` to send its request line and
  headers; a kept-alive connection may sit idle ``idle_timeout_seconds`` before its next request,
  then has ``header_timeout_seconds`` from its first byte. A silent connection is closed without
  a word; one that sent part of a request gets 408. A body must arrive within
  ``body_timeout_seconds`` (408).
- **Connection cap.** At most ``max_connections`` connections are served at once (lowered at
  start-up to fit the open-file limit, keeping a reserve for the rest of the relay). A
  connection beyond the cap gets a 503 ``ServiceUnavailable`` with ``Retry-After`` and is
  closed; at most ``REFUSING_MAX`` are being answered so at a time, later ones are closed at once.
- **accept() failures** for want of file descriptors or memory pause accepting with a growing
  backoff (``ACCEPT_BACKOFF_*``), counted and logged at most once per ``LOG_INTERVAL_SECONDS``,
  instead of gevent's traceback per attempt.
- **Sizes.** A request line up to ``MAX_REQUEST_LINE_BYTES`` (room for getBlocks' 1000 CIDs;
  414 beyond), headers up to ``MAX_HEADER_BYTES`` in all (431 beyond), a body up to
  ``max_body_bytes`` whether it has a Content-Length (413 before the app runs) or is chunked
  (413 when the app reads past it). A body the app left unread is drained only if small;
  otherwise the connection is closed after the response.
- **XRPC JSON** for every error the server itself answers (400, 408, 413, 414, 431, 500, 503).
- **Websocket upgrades only on the firehose path** (``web.firehose.pre_upgrade_hook``).
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import resource
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import gevent
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler
from prometheus_client import Counter, Gauge

from web.firehose import pre_upgrade_hook
from web.http_input import BoundedInput, HeaderBytesCap

log = logging.getLogger(__name__)

MAX_REQUEST_LINE_BYTES = 80 * 1024  # getBlocks with 1000 CIDs (~65 bytes each) and a long DID
MAX_HEADER_BYTES = 64 * 1024  # all header lines of one request together
REFUSING_MAX = 64  # over-cap connections being answered 503 at once; later ones are closed unanswered
REFUSE_SECONDS = 1.0  # how long an over-cap connection may take to send its request and read the 503
FILE_RESERVE_MIN = 128  # open files kept for the rest of the relay: a quarter of the limit, 128 to half of it
ACCEPT_BACKOFF_MIN_SECONDS = 0.05
ACCEPT_BACKOFF_MAX_SECONDS = 2.0
LOG_INTERVAL_SECONDS = 10.0
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

CONNECTIONS = Gauge("skyrelay_http_connections", "HTTP connections being served")
REJECTED = Counter("skyrelay_http_rejected_total", "Requests and connections the HTTP server refused", ["reason"])
ACCEPT_ERRORS = Counter("skyrelay_http_accept_errors_total", "accept() failures of the HTTP listener", ["reason"])


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The front end's limits; ``from_settings`` maps the ``http_*`` settings."""

    header_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    body_timeout_seconds: float = 30.0
    max_connections: int = 4096
    max_body_bytes: int = 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Any) -> HttpLimits:
        return cls(
            header_timeout_seconds=settings.http_header_timeout_seconds,
            idle_timeout_seconds=settings.http_idle_timeout_seconds,
            body_timeout_seconds=settings.http_body_timeout_seconds,
            max_connections=settings.http_max_connections,
            max_body_bytes=settings.http_max_body_bytes,
        )


def connection_cap(wanted: int) -> int:
    """``wanted``, lowered so that the connections and a reserve fit in this process's open-file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    reserve = min(max(FILE_RESERVE_MIN, soft // 4), soft // 2)
    return max(1, min(wanted, soft - reserve))


def error_response(status: int, error: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response (closing the connection) with an XRPC error body."""
    body = json.dumps({"error": error, "message": message}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_OVER_CAPACITY = error_response(
    503, "ServiceUnavailable", "too many connections; try again later", (("Retry-After", "5"),)
)


class _IdleTimeout(BaseException):
    """No request began on a connection in time (closed without an answer)."""


class _HeaderTimeout(BaseException):
    """A request line and headers did not arrive in time (408)."""


class RelayHandler(WebSocketHandler):
    """One connection: requests read under deadlines and size caps; server errors as XRPC JSON."""

    server: RelayWSGIServer
    wsgi_input: Any
    _requests_seen = 0
    _header_timer: gevent.Timeout

    def handle_one_request(self) -> Any:
        """Read and answer one request: ``True`` to read another on this connection, ``None`` to close it."""
        if self.rfile.closed:
            return None
        limits = self.server.limits
        first = self._requests_seen == 0
        header_timer = self._header_timer = gevent.Timeout(limits.header_timeout_seconds, _HeaderTimeout)
        received = False
        try:
            if first:
                header_timer.start()  # a new connection's clock starts at once
            with gevent.Timeout(None if first else limits.idle_timeout_seconds, _IdleTimeout):
                if not self.rfile.peek(1):
                    return None  # closed by the client
            received = True
            if not first:
                header_timer.start()
            line = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
            if len(line) > MAX_REQUEST_LINE_BYTES:
                return self._reject(414, "request_line_too_long", "RequestTooLong", "the request line is too long")
            if not line.endswith(b"\n"):
                return None  # the client closed mid-line
            self.requestline = line.decode("latin-1").rstrip()
            self.response_length = 0
            try:
                self.read_request(self.requestline)
            except HeaderBytesCap.TooLarge:
                return self._reject(431, "headers_too_large", "HeadersTooLarge", "the request headers are too large")
            except (ValueError, OSError, http.client.HTTPException) as exc:  # gevent's parse errors are ValueErrors
                log.debug("bad request from=%s error=%s", self.client_address, exc)
                return self._reject(400, "bad_request", "InvalidRequest", "malformed HTTP request")
        except _IdleTimeout:
            return None
        except _HeaderTimeout:
            if not received:
                REJECTED.labels("idle_connection").inc()
                return None
            return self._reject(408, "header_timeout", "RequestTimeout", "the request headers took too long")
        except OSError:
            return None
        finally:
            header_timer.close()
        self._requests_seen += 1
        if self.content_length is not None and self.content_length > limits.max_body_bytes:
            return self._reject(413, "body_too_large", "PayloadTooLarge", "the request body is too large")
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        if isinstance(self.wsgi_input, BoundedInput) and self.wsgi_input.abandoned:
            self._linger()
            return None
        if self.close_connection or self.rfile.closed:
            return None
        return True

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 (gevent's name)
        return super().MessageClass(HeaderBytesCap(fp, MAX_HEADER_BYTES), *args)

    def get_environ(self) -> Any:
        environ = super().get_environ()
        bounded = BoundedInput(
            self.wsgi_input,
            max_bytes=self.server.limits.max_body_bytes,
            timeout_seconds=self.server.limits.body_timeout_seconds,
        )
        self.wsgi_input = bounded
        if environ["wsgi.input"] is not self.rfile:  # an upgrade reads the socket itself
            environ["wsgi.input"] = bounded
        return environ

    def _reject(self, status: int, reason: str, error: str, message: str) -> None:
        """Answer ``status`` with an XRPC error, then close (after letting the client read it)."""
        self._header_timer.close()  # the answer and the linger are not the client's time to send headers
        REJECTED.labels(reason).inc()
        self.status = str(status)
        try:
            self.socket.sendall(error_response(status, error, message))
        except OSError:
            return
        self._linger()

    def _linger(self) -> None:
        """After answering a request whose body was left unread: let the client read the answer, then close."""
        try:
            self.socket.shutdown(socket.SHUT_WR)
            with gevent.Timeout(REFUSE_SECONDS, False):
                drained = 0
                while drained < self.server.limits.max_body_bytes and (chunk := self.socket.recv(65536)):
                    drained += len(chunk)
        except OSError:
            pass

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        """gevent's hook for bad client input found while reading a body: the answer to send, then close."""
        log.debug("bad request from=%s error=%s", self.client_address, ex)
        REJECTED.labels("bad_request").inc()
        return "400", error_response(400, "InvalidRequest", "malformed HTTP request")

    def _send_error_response_if_possible(self, error_code: int) -> None:
        if self.response_length:
            self.close_connection = True
            return
        if error_code >= 500:
            error, message = "InternalServerError", "internal server error"
        else:
            error, message = "InvalidRequest", "malformed HTTP request body"
        body = json.dumps({"error": error, "message": message}).encode()
        headers = [("Content-Type", "application/json"), ("Connection", "close"), ("Content-Length", str(len(body)))]
        try:
            self.start_response(f"{error_code} {HTTPStatus(error_code).phrase}", headers)
            self.write(body)
        except OSError:
            self.close_connection = True


def _no_delay(sock: Any) -> None:
    """Send small answers at once: with Nagle's algorithm a response written in two parts (headers,
    then body) waits for the client's delayed ACK of the first, about 40 ms."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (a Unix socket) or already closed
        pass


class RelayWSGIServer(WSGIServer):
    """gevent's ``WSGIServer`` with the relay's connection cap, accept backoff and ``RelayHandler``."""

    def __init__(self, listener: Any, application: Any, *, limits: HttpLimits | None = None) -> None:
        super().__init__(listener, application, handler_class=RelayHandler, log=None, error_log=log)
        self.limits = limits or HttpLimits()
        self.max_connections = connection_cap(self.limits.max_connections)
        self.pre_start_hook = pre_upgrade_hook
        self.active = 0
        self._refusing = 0
        self._backoff = 0.0
        self._resume: gevent.Greenlet | None = None
        self._last_log = 0.0
        self._unlogged = 0
        if self.max_connections < self.limits.max_connections:
            log.info(
                "connection cap lowered to fit the open-file limit max_connections=%d wanted=%d",
                self.max_connections,
                self.limits.max_connections,
            )

    def handle(self, sock: Any, address: Any) -> None:
        if self.active >= self.max_connections:
            self._refuse(sock)
            return
        self.active += 1
        CONNECTIONS.inc()
        _no_delay(sock)
        try:
            super().handle(sock, address)
        finally:
            self.active -= 1
            CONNECTIONS.dec()

    def _refuse(self, sock: Any) -> None:
        """Answer 503 to a connection over the cap (after its request, so the client reads the answer)."""
        REJECTED.labels("over_capacity").inc()
        if self._refusing >= REFUSING_MAX:
            return  # closed at once by the server
        self._refusing += 1
        try:
            with gevent.Timeout(REFUSE_SECONDS, False):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 16384 and (chunk := sock.recv(4096)):
                    head += chunk
            sock.sendall(_OVER_CAPACITY)
            sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(REFUSE_SECONDS, False):
                while sock.recv(4096):
                    pass
        except OSError:
            pass
        finally:
            self._refusing -= 1

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                raise
            self._accept_failed(exc)
            return None
        self._backoff = 0.0
        return accepted

    def _accept_failed(self, exc: OSError) -> None:
        """Pause accepting for a growing while; count; log at most once per interval."""
        reason = errno.errorcode.get(exc.errno or 0, "other")
        ACCEPT_ERRORS.labels(reason).inc()
        self._backoff = min(ACCEPT_BACKOFF_MAX_SECONDS, max(ACCEPT_BACKOFF_MIN_SECONDS, self._backoff * 2))
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_SECONDS:
            log.warning(
                "accept failed, pausing reason=%s pause_s=%.2f connections=%d failures_since_last_log=%d",
                reason,
                self._backoff,
                self.active,
                self._unlogged,
            )
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1
        self.stop_accepting()
        if self._resume is not None:
            self._resume.kill(block=False)
        self._resume = gevent.spawn_later(self._backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self.started and not self.closed:
            self.start_accepting()

    def close(self) -> None:
        if self._resume is not None:
            self._resume.kill(block=False)
            self._resume = None
        super().close()
