"""XRPC request inputs as typed values: one parser for every integer and cursor, small JSON bodies; 4xx otherwise.

Integers are ASCII digits only (``str.isdigit`` also accepts ``²`` and ``٣``, and ``int`` would
then raise or silently convert), at most as many digits as the upper bound has, within
``[low, high]``. A parameter given twice is refused rather than silently reduced to one value.
Every refusal is ``XrpcError("InvalidRequest", ...)``, which the app answers as a 400 XRPC body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flask import request

from web.xrpc_errors import XrpcError

#: Largest seq or row id a cursor may name (a signed 64-bit integer, as the databases store them).
MAX_CURSOR = 2**63 - 1


def parse_int(
    name: str, values: Sequence[str], *, default: int | None, low: int, high: int, empty_ok: bool = True
) -> int | None:
    """The single integer in ``values`` (a parameter's values, in order), or ``default`` when absent.

    An empty value counts as absent unless ``empty_ok`` is false.

    Raises ``XrpcError`` (400 InvalidRequest) for a repeated parameter, anything but ASCII
    digits, more digits than ``high`` has, or a value outside ``[low, high]``.
    """
    if len(values) > 1:
        raise XrpcError("InvalidRequest", f"{name} must be given at most once")
    raw = values[0] if values else ""
    if raw == "" and (empty_ok or not values):
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))):
        raise XrpcError("InvalidRequest", f"{name} must be an integer from {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise XrpcError("InvalidRequest", f"{name} must be an integer from {low} to {high}")
    return value


def int_arg(name: str, *, default: int, low: int, high: int) -> int:
    """Query parameter ``name`` of the current request as an integer (``default`` when absent)."""
    value = parse_int(name, request.args.getlist(name), default=default, low=low, high=high)
    assert value is not None
    return value


def cursor_values(name: str, values: Sequence[str], *, empty_ok: bool = True) -> int | None:
    """A seq or id cursor from ``values``: ``None`` when absent, else an integer from 0 to ``MAX_CURSOR``."""
    return parse_int(name, values, default=None, low=0, high=MAX_CURSOR, empty_ok=empty_ok)


def str_arg(name: str, *, max_length: int, required: bool = False) -> str:
    """Query parameter ``name`` as text of at most ``max_length`` characters ("" when absent and optional)."""
    values = request.args.getlist(name)
    if len(values) > 1:
        raise XrpcError("InvalidRequest", f"{name} must be given at most once")
    value = values[0] if values else ""
    if not value and required:
        raise XrpcError("InvalidRequest", f"{name} is required")
    if len(value) > max_length:
        raise XrpcError("InvalidRequest", f"{name} is longer than {max_length} characters")
    return value


def json_body(max_bytes: int) -> Any:
    """The request body parsed as JSON (``None`` if it is not JSON); 413 ``PayloadTooLarge`` past ``max_bytes``.

    Reads at most ``max_bytes + 1`` bytes, whether the body has a Content-Length or is chunked.
    """
    if (request.content_length or 0) > max_bytes:
        raise XrpcError("PayloadTooLarge", f"the request body is larger than {max_bytes} bytes", status=413)
    stream = request.stream
    data = b""
    while len(data) <= max_bytes:
        chunk = stream.read(max_bytes + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > max_bytes:
        raise XrpcError("PayloadTooLarge", f"the request body is larger than {max_bytes} bytes", status=413)
    try:
        return json.loads(data)
    except ValueError:
        return None
