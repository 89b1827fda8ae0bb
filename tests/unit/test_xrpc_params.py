"""XRPC parameter parsing: any text is an in-range integer or a 400 InvalidRequest, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from web.xrpc_errors import XrpcError
from web.xrpc_params import MAX_CURSOR, cursor_values, parse_int


@given(st.lists(st.text(max_size=40), max_size=3))
def test_any_text_is_an_in_range_integer_or_invalid_request(values: list[str]) -> None:
    try:
        value = parse_int("limit", values, default=50, low=1, high=1000)
    except XrpcError as exc:
        assert (exc.status, exc.error) == (400, "InvalidRequest")
        return
    assert value is not None and 1 <= value <= 1000
    if values and values[0]:
        assert values[0].isascii() and values[0].isdigit()


@pytest.mark.parametrize("raw", ["²", "٣", "\uff15", "1²", "-1", "+1", " 1", "1 ", "1_000", "0x10", "1e3", "9" * 5000])
def test_non_ascii_signs_and_overlong_values_are_refused(raw: str) -> None:
    with pytest.raises(XrpcError):
        parse_int("limit", [raw], default=50, low=1, high=1000)
    with pytest.raises(XrpcError):
        cursor_values("cursor", [raw])


def test_bounds_repeats_and_defaults() -> None:
    assert parse_int("limit", [], default=50, low=1, high=1000) == 50
    assert parse_int("limit", [""], default=50, low=1, high=1000) == 50
    assert parse_int("limit", ["1000"], default=50, low=1, high=1000) == 1000
    assert cursor_values("cursor", [str(MAX_CURSOR)]) == MAX_CURSOR
    for bad in (["0"], ["1001"], ["1", "2"]):
        with pytest.raises(XrpcError):
            parse_int("limit", bad, default=50, low=1, high=1000)
    with pytest.raises(XrpcError):
        cursor_values("cursor", [str(MAX_CURSOR + 1)])
    with pytest.raises(XrpcError):
        cursor_values("cursor", [""], empty_ok=False)
