"""The one outbound client: every HTTP request and upstream websocket connection of the relay.

Rules (HACKING.md, "Outbound connections"):
- The URL's scheme must be https/wss; http/ws only when the policy allows plaintext
  (development) or for a trusted host (the configured PLC directory).
- The name is resolved once and every address checked (``actors.addrguard``); the socket
  connects to a checked address, and TLS still verifies the certificate against the name
  (SNI too). No proxy from the environment is used; redirects are never followed (a 3xx
  is a ``BadStatus`` like any other unexpected status).
- A request has a total deadline (connect, TLS, send, head and body) as well as a per-read
  timeout, and a body cap enforced from Content-Length up front and while streaming.
- Failures are the typed ``actors.outbound_errors``; counted by kind.
"""

from __future__ import annotations

import io
import select
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, cast
from urllib.parse import SplitResult, urlsplit

from prometheus_client import Counter

from actors.addrguard import AddressPolicy, Resolver, resolve_checked, resolver_for, system_resolver
from actors.outbound_errors import (
    OUTBOUND_KINDS,
    BadStatus,
    BadUrl,
    ConnectFailed,
    OutboundError,
    OutboundTimeout,
)
from actors.outbound_http import ClosedBeforeAnswer, SocketReader, body_chunks, read_response_head, reusable
from actors.outbound_pool import ConnectionPool, PoolKey
from config.settings import Settings

USER_AGENT = "skyrelay/0.1"
FAILURES = Counter("skyrelay_outbound_failures_total", "Failed outbound requests and connections, by kind", ["kind"])
for _kind in OUTBOUND_KINDS:
    FAILURES.labels(_kind)
_PLAINTEXT = {"http": "https", "ws": "wss"}
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of one request."""

    total_seconds: float  # the whole request: resolve, connect, TLS, send, head and body
    read_seconds: float  # the longest wait for any one read
    max_bytes: int  # the largest body accepted


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes  # empty when the body went to a sink


class Connection:
    """An open connection to a checked address; ``reader`` is buffered over ``raw``."""

    def __init__(self, sock: socket.socket, raw: SocketReader, buffer_bytes: int) -> None:
        self.sock = sock
        self.raw = raw
        self.reader = io.BufferedReader(raw, buffer_size=buffer_bytes)

    def send(self, data: bytes) -> None:
        deadline = self.raw.deadline
        timeout = self.raw.read_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise OutboundTimeout("the request outlived its deadline")
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise OutboundTimeout("sending timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed("the connection failed while sending", detail=type(exc).__name__) from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class OutboundClient:
    """Makes checked outbound connections and HTTP requests under ``policy``."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.pool: ConnectionPool[Connection] = ConnectionPool()  # kept-alive connections (``keep_alive=True``)

    @classmethod
    def for_settings(cls, insecure: bool, networks: Iterable[str] = (), dns_server: str = "") -> OutboundClient:
        return cls(AddressPolicy.for_mode(insecure, networks), resolver=resolver_for(dns_server))

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundClient:
        return cls.for_settings(
            settings.allow_insecure_hosts, settings.outbound_allowed_networks, settings.outbound_dns_server
        )

    def trusting(self, url: str) -> OutboundClient:
        """A client that exempts ``url``'s host (operator configuration) from the address policy."""
        host = urlsplit(url).hostname
        if not host:
            return self
        return OutboundClient(self.policy.trusting(host), resolver=self.resolver, ssl_context=self.ssl_context)

    # -- connections ----------------------------------------------------------------------------
    def connect(self, url: str, *, deadline: float, read_timeout_s: float, buffer_bytes: int = 65536) -> Connection:
        """A connection to ``url``'s host (TLS for https/wss) whose reads time out after ``read_timeout_s``.

        The connection's ``raw.deadline`` is ``deadline``; a caller that keeps the connection
        (a websocket) clears it once the handshake is done.
        """
        try:
            parts = self._checked_url(url)
            return self._connect(parts, deadline, read_timeout_s, buffer_bytes)
        except OutboundError as exc:
            FAILURES.labels(exc.kind).inc()
            raise

    def _checked_url(self, url: str) -> SplitResult:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise BadUrl("malformed URL") from None
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
            raise BadUrl("not an http(s) or ws(s) URL with a host")
        trusted = parts.hostname.lower() in self.policy.trusted_hosts
        if parts.scheme in _PLAINTEXT and not (self.policy.allow_plaintext or trusted):
            raise BadUrl(f"only {_PLAINTEXT[parts.scheme]}:// URLs are allowed")
        return parts

    def _connect(self, parts: SplitResult, deadline: float, read_timeout_s: float, buffer_bytes: int) -> Connection:
        host = cast(str, parts.hostname)
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        addresses = resolve_checked(host, self.policy, self.resolver)
        failure = "no address"
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OutboundTimeout(f"connecting to {host} timed out")
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(min(read_timeout_s, remaining))
                sock.connect((str(address), port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sock.close()
                failure = type(exc).__name__
                continue
            if parts.scheme in ("https", "wss"):
                sock = self._tls(sock, host, deadline)
            return Connection(sock, SocketReader(sock, read_timeout_s), buffer_bytes)
        raise ConnectFailed(f"could not connect to {host}", detail=failure)

    def _tls(self, sock: socket.socket, host: str, deadline: float) -> socket.socket:
        """Wrap ``sock`` in TLS for ``host`` (SNI and certificate name); the handshake obeys ``deadline``."""
        try:
            tls = self.ssl_context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ConnectFailed(f"TLS with {host} failed", detail=type(exc).__name__) from None
        tls.setblocking(False)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OutboundTimeout(f"the TLS handshake with {host} timed out")
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    select.select([tls], [], [], remaining)
                except ssl.SSLWantWriteError:
                    select.select([], [tls], [], remaining)
        except (OSError, ssl.SSLError) as exc:
            tls.close()
            raise ConnectFailed(f"TLS with {host} failed", detail=type(exc).__name__) from None
        except OutboundTimeout:
            tls.close()
            raise
        tls.setblocking(True)
        return tls

    # -- HTTP -----------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        url: str,
        limits: Limits,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        accept: Iterable[int] = (200,),
        sink: BinaryIO | None = None,
        keep_alive: bool = False,
    ) -> Response:
        """Send one request; the answer if its status is in ``accept`` (else ``BadStatus``).

        The body is returned, or written to ``sink`` piece by piece (then ``Response.body`` is
        empty). Any failure is an ``OutboundError``. With ``keep_alive`` the request may go
        out on a connection an earlier one left in ``self.pool``, and its own connection is
        left there when the answer allows; a GET whose kept connection turns out closed by the
        server is sent again, once, on a new connection.
        """
        deadline = time.monotonic() + limits.total_seconds
        try:
            parts = self._checked_url(url)
            if parts.scheme not in ("http", "https"):
                raise BadUrl("not an http(s) URL")
            key: PoolKey = (parts.scheme, cast(str, parts.hostname).lower(), parts.port or _DEFAULT_PORTS[parts.scheme])
            payload = _request_head(method, parts, headers or {}, body, keep_alive) + (body or b"")
            kept = self.pool.take(key) if keep_alive else None
            if kept is not None:
                try:
                    return self._exchange(kept, key, payload, limits, deadline, accept, sink, True)
                except (ClosedBeforeAnswer, ConnectFailed):
                    if method != "GET" or kept.raw.received:
                        raise
            conn = self._connect(parts, deadline, limits.read_seconds, 65536)
            return self._exchange(conn, key, payload, limits, deadline, accept, sink, keep_alive)
        except OutboundError as exc:
            FAILURES.labels(exc.kind).inc()
            raise

    def _exchange(
        self,
        conn: Connection,
        key: PoolKey,
        payload: bytes,
        limits: Limits,
        deadline: float,
        accept: Iterable[int],
        sink: BinaryIO | None,
        keep_alive: bool,
    ) -> Response:
        """``payload`` (a request) and its whole answer on ``conn``, which is then pooled or closed."""
        keep = False
        try:
            conn.raw.deadline = deadline
            conn.raw.read_timeout_s = limits.read_seconds
            conn.raw.received = 0
            conn.send(payload)
            head = read_response_head(conn.reader)
            while 100 <= head.status < 200:  # interim answers (100 Continue) come before the real one
                head = read_response_head(conn.reader)
            if head.status not in accept:
                raise BadStatus(f"answered HTTP {head.status}", head.status)
            chunks = []
            for piece in body_chunks(conn.reader, head.headers, limits.max_bytes):
                if sink is not None:
                    sink.write(piece)
                else:
                    chunks.append(piece)
            keep = keep_alive and reusable(head)
            return Response(head.status, head.headers, b"".join(chunks))
        finally:
            if keep:
                conn.raw.deadline = None
                self.pool.put(key, conn)
            else:
                conn.close()

    def get(
        self, url: str, limits: Limits, *, headers: dict[str, str] | None = None, sink: BinaryIO | None = None
    ) -> Response:
        return self.request("GET", url, limits, headers=headers, sink=sink)


def _request_head(
    method: str, parts: SplitResult, headers: dict[str, str], body: bytes | None, keep_alive: bool = False
) -> bytes:
    """The request line and headers; the caller's ``headers`` override the defaults (by name, any case)."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = {"host": ("Host", parts.netloc), "user-agent": ("User-Agent", USER_AGENT),
              "accept-encoding": ("Accept-Encoding", "identity"),
              "connection": ("Connection", "keep-alive" if keep_alive else "close")}  # fmt: skip
    if body is not None:
        fields["content-length"] = ("Content-Length", str(len(body)))
    for name, value in headers.items():
        if "\r" in name + value or "\n" in name + value:
            raise BadUrl("header values may not contain line breaks")
        fields[name.lower()] = (name, value)
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in fields.values())]
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    except UnicodeEncodeError:
        raise BadUrl("the request line and headers must be ASCII") from None
