"""Bounded readers for the HTTP server: a request body with a size cap and a deadline, header lines with a byte cap.

``BoundedInput`` wraps gevent's ``pywsgi.Input`` (which already decodes chunked bodies) and
counts what the application reads: past ``max_bytes`` it raises werkzeug's
``RequestEntityTooLarge`` (413), past the deadline ``RequestTimeout`` (408), on a framing error
``BadRequest`` (400), so Flask answers
them with its XRPC error handlers, whether the body is chunked or has a Content-Length. After
the response, gevent drains what the application left unread so that the connection can be
reused; ``_discard`` drains only a small remainder quickly and otherwise marks the input
``abandoned`` (the server then closes the connection).
"""

from __future__ import annotations

import time
from typing import Any

import gevent
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, RequestTimeout

DISCARD_MAX_BYTES = 64 * 1024  # unread body drained to keep a connection alive; more closes it
DISCARD_SECONDS = 1.0  # time allowed to drain it


class _Expired(Exception):
    """The body deadline passed while reading."""


class BoundedInput:
    """A request body stream of at most ``max_bytes``, read within ``timeout_seconds`` of the first read."""

    def __init__(self, inner: Any, *, max_bytes: int, timeout_seconds: float) -> None:
        self._inner = inner
        self._max_bytes = max_bytes
        self._timeout_seconds = timeout_seconds
        self._deadline: float | None = None
        self._read = 0
        self._failed = False
        self.abandoned = False

    def read(self, length: int | None = None) -> bytes:
        if length is None or length < 0 or length > self._max_bytes - self._read + 1:
            length = self._max_bytes - self._read + 1  # one byte past the cap proves it is exceeded
        return self._guard(self._inner.read, length)

    def readline(self, size: int | None = None) -> bytes:
        if size is None or size < 0 or size > self._max_bytes - self._read + 1:
            size = self._max_bytes - self._read + 1
        return self._guard(self._inner.readline, size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return list(self)

    def __iter__(self) -> BoundedInput:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _guard(self, read: Any, size: int) -> bytes:
        if self._failed:
            raise RequestEntityTooLarge()
        if self._deadline is None:
            self._deadline = time.monotonic() + self._timeout_seconds
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise _Expired
            with gevent.Timeout(remaining, _Expired):
                data: bytes = read(size)
        except _Expired:
            self._failed = True
            raise RequestTimeout("the request body took too long") from None
        except OSError:  # bad chunked framing (gevent raises an IOError), or the client went away
            self._failed = True
            raise BadRequest("malformed or incomplete request body") from None
        self._read += len(data)
        if self._read > self._max_bytes:
            self._failed = True
            raise RequestEntityTooLarge(f"the request body is larger than {self._max_bytes} bytes")
        return data

    def _discard(self) -> None:
        """Called by gevent after the response: drain a small unread remainder, or give the connection up."""
        inner = self._inner
        if self._failed:
            self.abandoned = True
            return
        if inner.chunked_input:
            if inner.chunk_length == 0:  # the last chunk was read
                return
            left = None
        elif inner.content_length is None:
            return
        else:
            left = inner.content_length - inner.position
            if left == 0:
                return
        if left is None or left > DISCARD_MAX_BYTES:
            self.abandoned = True
            return
        with gevent.Timeout(DISCARD_SECONDS, False):
            inner._discard()
            return
        self.abandoned = True


class HeaderBytesCap:
    """A ``readline`` source over ``fp`` that refuses more than ``max_bytes`` of header lines in all."""

    class TooLarge(Exception):
        """The request's header lines exceed the cap."""

    def __init__(self, fp: Any, max_bytes: int) -> None:
        self._fp = fp
        self._left = max_bytes

    def readline(self, size: int = -1) -> bytes:
        limit = self._left + 1 if size < 0 else min(size, self._left + 1)
        line: bytes = self._fp.readline(limit)
        self._left -= len(line)
        if self._left < 0:
            raise HeaderBytesCap.TooLarge
        return line
