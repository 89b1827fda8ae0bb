"""HTTP/1.1 on one connected socket: reads under a deadline, a bounded response head, capped bodies.

``SocketReader`` is the raw layer under a ``BufferedReader``: every receive waits at most the
per-read timeout AND at most until the request's deadline, so a server that drips one byte
at a time cannot hold a request past its deadline. ``read_head`` parses the status line and
headers (at most ``MAX_HEAD_BYTES``); anything malformed is a ``ProtocolFailure``.
``body_chunks`` yields the body (Content-Length, chunked, or until close), never more than
``max_bytes`` in all: a declared length over the cap fails before a byte of it is read, and
a chunk that would pass the cap fails before it is read.
"""

from __future__ import annotations

import io
import re
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from actors.outbound_errors import ConnectFailed, OutboundTimeout, ProtocolFailure, TooLarge

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\r\n]*)?\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PIECE = 64 * 1024


class ClosedBeforeAnswer(ProtocolFailure):
    """The connection ended before a byte of the answer: a kept-alive connection the server closed."""


class ResponseHead(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-cased
    http11: bool  # HTTP/1.1 (persistent unless "Connection: close"), not HTTP/1.0


class SocketReader(io.RawIOBase):
    """Receives from ``sock`` with a per-read timeout and an optional overall ``deadline``."""

    def __init__(self, sock: socket.socket, read_timeout_s: float) -> None:
        super().__init__()
        self._sock = sock
        self.read_timeout_s = read_timeout_s
        self.deadline: float | None = None  # time.monotonic() value; None: per-read timeout only
        self.no_wait = False  # set around a probe: a read finds what has arrived or returns None
        self.received = 0  # bytes received since the owner last reset it (0: nothing of an answer yet)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int | None:  # type: ignore[override]
        if self.no_wait:
            self._sock.settimeout(0.0)
            try:
                return self._sock.recv_into(buffer)
            except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
                return None  # nothing has arrived (the buffered reader answers b"")
            except (OSError, ssl.SSLError) as exc:
                raise ConnectFailed("the connection failed while reading", detail=type(exc).__name__) from None
            finally:
                self._sock.settimeout(self.read_timeout_s)  # a send between reads must not find it non-blocking
        timeout = self.read_timeout_s
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise OutboundTimeout("the request outlived its deadline")
            timeout = min(timeout, remaining)
        self._sock.settimeout(timeout)
        try:
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            raise OutboundTimeout("no answer within the timeout") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed("the connection failed while reading", detail=type(exc).__name__) from None
        self.received += count
        return count


def read_head(reader: io.BufferedReader[Any]) -> tuple[int, dict[str, str]]:
    """Status and headers (names lower-cased) of one response head; ``ProtocolFailure`` if malformed."""
    head = read_response_head(reader)
    return head.status, head.headers


def read_response_head(reader: io.BufferedReader[Any]) -> ResponseHead:
    """One response head; ``ClosedBeforeAnswer`` if the connection ended first, ``ProtocolFailure`` if malformed."""
    budget = MAX_HEAD_BYTES
    line = reader.readline(budget + 1)
    if not line:
        raise ClosedBeforeAnswer("the connection closed before an answer")
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ProtocolFailure("malformed HTTP status line")
    budget -= len(line)
    headers: dict[str, str] = {}
    count = 0
    while True:
        line = reader.readline(budget + 1)
        budget -= len(line)
        if budget < 0:
            raise ProtocolFailure("HTTP response head too large")
        if not line.endswith(b"\n"):
            raise ProtocolFailure("the connection closed inside the response head")
        if line in (b"\r\n", b"\n"):
            return ResponseHead(int(match.group(2)), headers, match.group(1) == b"1")
        count += 1
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not _TOKEN.fullmatch(name) or count > MAX_HEADERS:
            raise ProtocolFailure("malformed HTTP header")
        key, value = name.lower(), value.strip()
        if key in headers and key in ("content-length", "transfer-encoding") and headers[key] != value:
            raise ProtocolFailure(f"conflicting {key} headers")
        headers[key] = f"{headers[key]}, {value}" if key in headers and key not in ("content-length",) else value


def reusable(head: ResponseHead) -> bool:
    """True when the connection may carry another request once this answer's body is read.

    HTTP/1.1 without ``Connection: close``, and a body delimited by its length or chunking
    (a body that ends at the close of the connection leaves nothing to reuse).
    """
    tokens = {token.strip().lower() for token in head.headers.get("connection", "").split(",")}
    if "close" in tokens or not head.http11:
        return False
    return "transfer-encoding" in head.headers or "content-length" in head.headers


def declared_length(headers: dict[str, str]) -> int | None:
    """The Content-Length, or ``None`` when absent or the body is chunked; ``ProtocolFailure`` if bad."""
    if "transfer-encoding" in headers:
        return None
    text = headers.get("content-length")
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ProtocolFailure("malformed Content-Length")
    return int(text)


def body_chunks(reader: io.BufferedReader[Any], headers: dict[str, str], max_bytes: int) -> Iterator[bytes]:
    """The body in pieces of at most 64 KiB; at most ``max_bytes`` in all (``TooLarge`` past it)."""
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        if encoding.lower() != "chunked":
            raise ProtocolFailure("unsupported Transfer-Encoding")
        yield from _chunked(reader, max_bytes)
        return
    length = declared_length(headers)
    if length is not None and length > max_bytes:
        raise TooLarge(f"the declared body of {length} bytes is larger than the cap of {max_bytes}")
    limit = max_bytes if length is None else length
    total = 0
    while length is None or total < length:
        # a declared length is read exactly (what follows it is not this answer's); an
        # undeclared one a byte past the cap, to tell a body at the cap from one over it
        piece = reader.read1(min(_PIECE, limit - total + (length is None)))
        if not piece:
            if length is not None:
                raise ProtocolFailure("the body ended before its Content-Length")
            return
        total += len(piece)
        if total > limit:
            raise TooLarge(f"the body is larger than the cap of {max_bytes} bytes")
        yield piece


def _chunked(reader: io.BufferedReader[Any], max_bytes: int) -> Iterator[bytes]:
    total = 0
    while True:
        size_line = reader.readline(1024)
        if not size_line.endswith(b"\n"):
            raise ProtocolFailure("malformed chunk size line")
        size_text = size_line.split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
            raise ProtocolFailure("malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            _skip_trailers(reader)
            return
        total += size
        if total > max_bytes:
            raise TooLarge(f"the chunked body is larger than the cap of {max_bytes} bytes")
        while size:
            piece = reader.read1(min(_PIECE, size))
            if not piece:
                raise ProtocolFailure("the connection closed inside a chunk")
            size -= len(piece)
            yield piece
        if reader.readline(3) not in (b"\r\n", b"\n"):
            raise ProtocolFailure("a chunk does not end with CRLF")


def _skip_trailers(reader: io.BufferedReader[Any]) -> None:
    budget = MAX_HEAD_BYTES
    while True:
        line = reader.readline(budget + 1)
        budget -= len(line)
        if budget < 0 or not line.endswith(b"\n"):
            raise ProtocolFailure("malformed chunked trailer")
        if line in (b"\r\n", b"\n"):
            return
