"""A small RFC 6455 websocket client for upstream firehoses, with hard limits on message size.

It connects through the outbound client (``actors.outbound``): the address is checked at
every connection (every reconnect), TLS verified against the name.

Why our own: the subscriber must cap what a hostile host can make us buffer (a declared
frame length is checked before any byte of it is read), answer pings, and stay cheap per
message. Plain sockets, so it is cooperative under gevent monkey-patching.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
import ssl
import struct
import threading
import time
from typing import BinaryIO, cast
from urllib.parse import urlsplit

from actors.outbound import OutboundClient
from actors.outbound_errors import OutboundError, ProtocolFailure
from actors.outbound_http import SocketReader, read_head

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketError(Exception):
    """The connection failed, closed, or the peer broke the protocol or our limits."""

    def __init__(self, message: str, *, reason: str = "ws_error") -> None:
        super().__init__(message)
        self.reason = reason


class WebSocketClosed(WebSocketError):
    """The peer closed the connection (close frame or EOF)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message, reason="closed")
        self.code = code


class WebSocketClient:
    """One client connection: ``connect()``, then ``recv()`` whole messages until closed."""

    def __init__(
        self, url: str, *, max_message_bytes: int, timeout_s: float = 30.0, outbound: OutboundClient | None = None
    ) -> None:
        self.url = url
        self.outbound = outbound or OutboundClient.for_settings(insecure=False)
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._rfile: BinaryIO | None = None
        self._send_lock = threading.Lock()  # a pinger greenlet and the reader may both send

    def connect(self) -> None:
        """Connect through the outbound client (checked address, TLS for wss) and do the handshake.

        The handshake must finish within ``timeout_s`` in all; afterwards each read waits at
        most ``timeout_s``. A refused handshake's reason is ``http_4xx``-style: a bounded label.
        """
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise WebSocketError("not a websocket URL", reason="bad_url")
        try:
            conn = self.outbound.connect(
                self.url, deadline=time.monotonic() + self.timeout_s, read_timeout_s=self.timeout_s,
                buffer_bytes=256 * 1024,
            )  # fmt: skip
        except OutboundError as exc:
            raise WebSocketError(f"connect failed: {exc}", reason=exc.kind) from None
        self._sock = conn.sock
        self._rfile = cast(BinaryIO, conn.reader)
        key = base64.b64encode(os.urandom(16))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            "User-Agent: skyrelay/0.1\r\n\r\n"
        )
        try:
            conn.send(request.encode())
            status, headers = read_head(conn.reader)
        except ProtocolFailure as exc:
            raise WebSocketError(f"bad handshake answer: {exc}", reason="bad_handshake") from None
        except OutboundError as exc:
            raise WebSocketError(f"handshake failed: {exc}", reason=exc.kind) from None
        conn.raw.deadline = None  # from now on only the per-read (idle) timeout applies
        if status != 101:
            raise WebSocketError(f"handshake refused with HTTP {status}", reason=f"http_{status // 100}xx")
        expect = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expect:
            raise WebSocketError("bad Sec-WebSocket-Accept", reason="bad_handshake")

    def _read_exact(self, n: int) -> bytes:
        assert self._rfile is not None
        try:
            data = self._rfile.read(n)
        except (OSError, ssl.SSLError, OutboundError) as exc:
            raise WebSocketError(f"read failed: {exc}", reason="read_failed") from None
        if data is None or len(data) < n:
            raise WebSocketClosed("connection closed by peer")
        return data

    def _read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read_exact(2)
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        if b0 & 0x70:
            raise WebSocketError("reserved bits set", reason="protocol_error")
        if b1 & 0x80:
            raise WebSocketError("server frames must not be masked", reason="protocol_error")
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exact(8))
        if opcode >= 0x8 and (length > 125 or not fin):
            raise WebSocketError("bad control frame", reason="protocol_error")
        if length > self.max_message_bytes:
            raise WebSocketError(f"frame of {length} bytes exceeds limit", reason="frame_too_large")
        return fin, opcode, self._read_exact(length) if length else b""

    def has_buffered(self) -> bool:
        """True when bytes of a next frame have arrived (in our buffer or the socket's); never waits.

        A frame partly arrived makes the next ``recv`` wait for the rest, as it would anyway.
        """
        reader = self._rfile
        if reader is None or not isinstance(reader, io.BufferedReader) or not isinstance(reader.raw, SocketReader):
            return False
        reader.raw.no_wait = True
        try:
            return bool(reader.peek(1))
        except (OSError, ssl.SSLError, OutboundError):
            return False  # the next recv meets the broken connection
        finally:
            reader.raw.no_wait = False

    def recv(self) -> bytes:
        """The next whole data message (binary or text as bytes); answers pings on the way."""
        parts: list[bytes] = []
        size = 0
        message_op: int | None = None
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                try:
                    self._send_frame(OP_CLOSE, payload[:2])
                except WebSocketError:
                    pass
                raise WebSocketClosed(f"peer closed (code {code})", code)
            if opcode == OP_CONT:
                if message_op is None:
                    raise WebSocketError("continuation without a message", reason="protocol_error")
            elif opcode in (OP_TEXT, OP_BINARY):
                if message_op is not None:
                    raise WebSocketError("new message inside a fragmented one", reason="protocol_error")
                message_op = opcode
            else:
                raise WebSocketError(f"unknown opcode {opcode}", reason="protocol_error")
            size += len(payload)
            if size > self.max_message_bytes:
                raise WebSocketError("message exceeds limit", reason="frame_too_large")
            if fin and not parts:
                return payload
            parts.append(payload)
            if fin:
                return b"".join(parts)

    def ping(self, payload: bytes = b"") -> None:
        self._send_frame(OP_PING, payload)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self._send_raw(head + mask + masked)

    def _send_raw(self, data: bytes) -> None:
        if self._sock is None:
            raise WebSocketError("not connected", reason="closed")
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise WebSocketError(f"send failed: {exc}", reason="send_failed") from None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.sendall(struct.pack("!BB", 0x80 | OP_CLOSE, 0x80) + os.urandom(4))
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass
