"""The atproto interop data-model vectors (tests/vectors/interop/data-model)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from protocol import cbor
from protocol.cid import cid_for_dag_cbor, cid_to_str
from protocol.dagcbor import check_data_model, decode, encode, from_json, to_json
from protocol.errors import CborError
from tests.support.testdata import VECTORS


def _load(name: str, expected_cases: int) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((VECTORS / "data-model" / name).read_text("utf-8"))
    assert len(cases) == expected_cases, f"{name}: expected {expected_cases} cases, found {len(cases)}"
    return cases


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def test_fixtures_json_to_cbor_to_cid() -> None:
    for index, case in enumerate(_load("data-model-fixtures.json", 3)):
        expected = _b64(case["cbor_base64"])
        value = from_json(case["json"])
        data = encode(value)
        assert data == expected, f"case {index}: CBOR bytes differ"
        assert cid_to_str(cid_for_dag_cbor(data)) == case["cid"], f"case {index}: CID differs"


def test_fixtures_cbor_to_json() -> None:
    for index, case in enumerate(_load("data-model-fixtures.json", 3)):
        data = _b64(case["cbor_base64"])
        value = decode(data)
        check_data_model(value)
        assert to_json(value) == case["json"], f"case {index}: JSON form differs"
        assert encode(value) == data, f"case {index}: strict re-encode differs"
        assert cbor.encode(cbor.decode(data)) == data, f"case {index}: libipld re-encode differs"


def test_invalid_json_is_rejected() -> None:
    for case in _load("data-model-invalid.json", 12):
        try:
            from_json(case["json"])
        except CborError:
            continue
        pytest.fail(f"accepted invalid case: {case['note']}")


def test_valid_json_is_accepted_and_round_trips() -> None:
    for case in _load("data-model-valid.json", 5):
        value = from_json(case["json"])
        data = encode(value)
        assert decode(data) == value, case["note"]
        assert from_json(to_json(value)) == value, case["note"]
