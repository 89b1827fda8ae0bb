"""Bounded request bodies and header lines, over gevent's own body reader (chunked and Content-Length)."""

from __future__ import annotations

import io

import pytest
from gevent.pywsgi import Input
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from web.http_input import DISCARD_MAX_BYTES, BoundedInput, HeaderBytesCap


def chunked(body: bytes, size: int = 1000) -> io.BufferedReader:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return io.BufferedReader(io.BytesIO(b"".join(parts) + b"0\r\n\r\n"))  # type: ignore[arg-type]


def test_a_chunked_body_within_the_cap_reads_whole() -> None:
    body = BoundedInput(Input(chunked(b"x" * 5000), None, chunked_input=True), max_bytes=5000, timeout_seconds=5)
    assert body.read() == b"x" * 5000
    body._discard()
    assert not body.abandoned


def test_a_chunked_body_over_the_cap_raises_413_without_reading_it_all() -> None:
    stream = chunked(b"x" * 1_000_000)
    body = BoundedInput(Input(stream, None, chunked_input=True), max_bytes=10_000, timeout_seconds=5)
    with pytest.raises(RequestEntityTooLarge):
        body.read()
    assert stream.tell() < 20_000
    body._discard()
    assert body.abandoned  # the connection closes instead of draining a megabyte


def test_bad_chunk_framing_is_a_400() -> None:
    stream = io.BufferedReader(io.BytesIO(b"zz\r\nabc\r\n"))  # type: ignore[arg-type]
    body = BoundedInput(Input(stream, None, chunked_input=True), max_bytes=10_000, timeout_seconds=5)
    with pytest.raises(BadRequest):
        body.read()


def test_a_small_unread_remainder_is_drained_a_large_one_abandoned() -> None:
    small = BoundedInput(Input(io.BytesIO(b"y" * 100), 100), max_bytes=10**6, timeout_seconds=5)
    small._discard()
    assert not small.abandoned
    size = DISCARD_MAX_BYTES + 1
    large = BoundedInput(Input(io.BytesIO(b"y" * size), size), max_bytes=10**6, timeout_seconds=5)
    large._discard()
    assert large.abandoned


def test_header_lines_are_capped_in_all() -> None:
    lines = HeaderBytesCap(io.BytesIO(b"A: b\r\n" * 10 + b"\r\n"), 100)
    assert [lines.readline(65537) for _ in range(11)][-1] == b"\r\n"
    capped = HeaderBytesCap(io.BytesIO(b"A: b\r\n" * 100), 100)
    with pytest.raises(HeaderBytesCap.TooLarge):
        for _ in range(100):
            capped.readline(65537)
