"""Paginated answers of other servers (listRepos, listHosts): typed entries, skipped entries, garbage refused."""

from __future__ import annotations

import json

import pytest

from actors.pages import BadPage, parse_list_hosts, parse_list_repos

DID = "did:plc:" + "a" * 24


def test_list_repos_entries_statuses_and_skips() -> None:
    body = json.dumps({"repos": [{"did": DID, "head": "x", "rev": "y", "active": True},
                                 {"did": "did:web:example.com", "active": False, "status": "takendown"},
                                 {"did": "did:plc:" + "b" * 24, "active": False, "status": "<script>"},
                                 {"did": "nope"}, {"did": None}, 3, [], {"did": "did:" + "x" * 3000}],
                       "cursor": "next"}).encode()  # fmt: skip
    repos, cursor, skipped = parse_list_repos(body)
    assert repos == [(DID, "active"), ("did:web:example.com", "takendown"), ("did:plc:" + "b" * 24, "inactive")]
    assert cursor == "next"
    assert skipped == ["bad_did"] * 5


@pytest.mark.parametrize(
    "body",
    [b"", b"<html>", b"[]", b'{"repos": {}}', b'{"repos": [], "cursor": 5}',
     json.dumps({"repos": [], "cursor": "c" * 5000}).encode(), b"[" * 100_000],
)  # fmt: skip
def test_list_repos_garbage_is_a_bad_page(body: bytes) -> None:
    with pytest.raises(BadPage):
        parse_list_repos(body)


def test_list_repos_last_page_has_no_cursor() -> None:
    assert parse_list_repos(b'{"repos": [], "cursor": ""}') == ([], None, [])


def test_list_hosts_entries_and_garbage() -> None:
    body = json.dumps({"hosts": [{"hostname": "pds.example.com", "accountCount": 7, "status": "active"},
                                 {"hostname": "b.example.com", "accountCount": True},
                                 {"hostname": ""}, {"accountCount": 1}, "x"]}).encode()  # fmt: skip
    hosts, cursor, skipped = parse_list_hosts(body)
    assert hosts == [("pds.example.com", 7, "active"), ("b.example.com", None, "active")]
    assert cursor is None and skipped == ["bad_hostname"] * 3
    for garbage in (b"[1, 2, 3]", b'{"hosts": "many"}', b"\xff\xfe"):
        with pytest.raises(BadPage):
            parse_list_hosts(garbage)
