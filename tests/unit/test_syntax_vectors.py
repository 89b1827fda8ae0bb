"""Syntax validators against every atproto interop syntax vector, plus TID encoding."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol import syntax
from protocol.errors import SyntaxInvalid
from tests.support.testdata import VECTORS

# Vector file stem (before _syntax_ / _parse_) -> (validator, ensure function).
VALIDATORS: dict[str, tuple[Callable[[str], bool], Callable[[str], str]]] = {
    "atidentifier": (syntax.is_valid_at_identifier, syntax.ensure_at_identifier),
    "aturi": (syntax.is_valid_at_uri, syntax.ensure_at_uri),
    "cid": (syntax.is_valid_cid, syntax.ensure_cid),
    "datetime": (syntax.is_valid_datetime, syntax.ensure_datetime),
    "did": (syntax.is_valid_did, syntax.ensure_did),
    "handle": (syntax.is_valid_handle, syntax.ensure_handle),
    "language": (syntax.is_valid_language, syntax.ensure_language),
    "nsid": (syntax.is_valid_nsid, syntax.ensure_nsid),
    "recordkey": (syntax.is_valid_record_key, syntax.ensure_record_key),
    "tid": (syntax.is_valid_tid, syntax.ensure_tid),
    "uri": (syntax.is_valid_uri, syntax.ensure_uri),
}
REASONS = {"atidentifier": "bad_at_identifier", "aturi": "bad_at_uri", "recordkey": "bad_record_key"}

VECTOR_FILES = sorted(
    [f"{kind}_syntax_{outcome}.txt" for kind in VALIDATORS for outcome in ("valid", "invalid")]
    + ["datetime_parse_invalid.txt", "language_parse_invalid.txt"]
)


def read_cases(path: Path) -> list[str]:
    """One case per line, kept exactly (leading/trailing spaces are part of some cases)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [line for line in lines if line and not line.startswith("#")]


def test_every_vector_file_is_covered() -> None:
    present = sorted(p.name for p in (VECTORS / "syntax").iterdir())
    assert present == sorted(VECTOR_FILES)


@pytest.mark.parametrize("name", VECTOR_FILES)
def test_vector_file(name: str) -> None:
    kind, _group, outcome = name.removesuffix(".txt").split("_")
    is_valid, ensure = VALIDATORS[kind]
    cases = read_cases(VECTORS / "syntax" / name)
    catalog = json.loads((VECTORS / "catalog.json").read_text())
    expected_count = {f["path"]: f.get("cases") for f in catalog["files"]}[f"syntax/{name}"]
    assert len(cases) == expected_count, "vector file parsed into a different number of cases"

    should_pass = outcome == "valid"
    wrong = [case for case in cases if is_valid(case) is not should_pass]
    assert not wrong, f"{len(wrong)} of {len(cases)} cases misjudged: " + ", ".join(
        repr(c if len(c) < 60 else c[:60] + "...") for c in wrong
    )
    for case in cases:
        if should_pass:
            assert ensure(case) == case
        else:
            with pytest.raises(SyntaxInvalid) as info:
                ensure(case)
            assert info.value.reason == REASONS.get(kind, f"bad_{kind}")


@pytest.mark.parametrize("is_valid", [v for v, _ in VALIDATORS.values()])
@pytest.mark.parametrize("value", [None, 12345, b"did:plc:abc", ["a"]])
def test_non_strings_are_invalid(is_valid: Callable[[object], bool], value: object) -> None:
    assert is_valid(value) is False


def test_ensure_error_message_truncates_long_input() -> None:
    with pytest.raises(SyntaxInvalid) as info:
        syntax.ensure_did("x" * 10_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0000-01-01T01:00:00+01:00", True),  # exactly year 0 in UTC
        ("0000-01-01T00:59:59.999+01:00", False),
        ("2024-02-29T00:00:00Z", True),
        ("2023-02-29T00:00:00Z", False),
        ("1900-02-29T00:00:00Z", False),
        ("2000-02-29T00:00:00Z", True),
        ("1985-04-31T00:00:00Z", False),
        ("1985-04-12T23:59:60Z", False),  # no leap seconds
        ("1985-04-12T23:20:50+24:00", False),
        ("1985-04-12T23:20:50-00:00", False),
        ("1985-04-12T23:20:50.123456789012345678901Z", False),  # 21 fraction digits
    ],
)
def test_datetime_edges(text: str, ok: bool) -> None:
    assert syntax.is_valid_datetime(text) is ok


@pytest.mark.parametrize(
    ("tag", "ok"),
    [("en-a", False), ("en-a-b-foo", False), ("x", False), ("i", False), ("en-x", False), ("en-x-a", True)],
)
def test_language_singletons_need_subtags(tag: str, ok: bool) -> None:
    assert syntax.is_valid_language(tag) is ok


def test_tid_round_trip_and_order() -> None:
    tids = [syntax.make_tid(ts, clock) for ts, clock in [(0, 0), (1, 0), (1, 1), (1_700_000_000_000_000, 1023)]]
    assert tids[0] == "2222222222222"
    assert tids == sorted(tids), "TIDs must sort like their timestamps"
    for tid in tids:
        assert syntax.is_valid_tid(tid)
    assert syntax.tid_to_timestamp_us(tids[3]) == 1_700_000_000_000_000
    assert syntax.tid_to_int(tids[3]) & 1023 == 1023
    assert syntax.make_tid((1 << 53) - 1, 1023)[0] == "b"  # top bit of 64 stays zero


def test_tid_decodes_vector_timestamp() -> None:
    # 3jzfcijpj2z2a is a 2023 TID in the vectors: decode it to a plausible instant.
    us = syntax.tid_to_timestamp_us("3jzfcijpj2z2a")
    assert 1_640_995_200_000_000 < us < 1_735_689_600_000_000  # 2022 .. 2025
    assert syntax.make_tid(us, syntax.tid_to_int("3jzfcijpj2z2a") & 1023) == "3jzfcijpj2z2a"


@pytest.mark.parametrize(("ts", "clock"), [(-1, 0), (1 << 53, 0), (0, -1), (0, 1024)])
def test_make_tid_rejects_out_of_range(ts: int, clock: int) -> None:
    with pytest.raises(ValueError):
        syntax.make_tid(ts, clock)


def test_tid_to_timestamp_rejects_bad_tid() -> None:
    with pytest.raises(SyntaxInvalid) as info:
        syntax.tid_to_timestamp_us("3JZFCIJPJ2Z2A")
    assert info.value.reason == "bad_tid"
