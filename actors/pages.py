"""Parse paginated JSON answers of other servers (``listRepos``, ``listHosts``) into typed pages.

Parse, don't validate: bytes in, typed entries out. A body that is not the expected answer at
all raises ``BadPage``; an unusable entry inside a good page is skipped and its reason
returned, for the caller to count.
"""

from __future__ import annotations

import json
from typing import Any

from protocol.syntax import is_valid_did

MAX_CURSOR_CHARS = 1024


class BadPage(Exception):
    """The body is not the expected paginated answer."""


def _page(body: bytes, key: str) -> tuple[list[Any], str | None]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadPage("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise BadPage(f"no {key} list")
    cursor = doc.get("cursor")
    if cursor is not None and (not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_CHARS):
        raise BadPage("cursor is not a short string")
    return doc[key], cursor or None


def parse_list_repos(body: bytes) -> tuple[list[tuple[str, str]], str | None, list[str]]:
    """``(did, upstream status)`` of each usable entry, the next cursor, and the skip reasons."""
    items, cursor = _page(body, "repos")
    out: list[tuple[str, str]] = []
    skipped: list[str] = []
    for item in items:
        did = item.get("did") if isinstance(item, dict) else None
        if not isinstance(did, str) or len(did) > 2048 or not is_valid_did(did):
            skipped.append("bad_did")
            continue
        active = item.get("active", True)
        status = item.get("status")
        if active is False:
            usable = isinstance(status, str) and status.isalpha() and len(status) < 32
            out.append((did, status if usable and isinstance(status, str) else "inactive"))
        else:
            out.append((did, "active"))
    return out, cursor, skipped


def parse_list_hosts(body: bytes) -> tuple[list[tuple[str, int | None, str]], str | None, list[str]]:
    """``(hostname, account count or None, status)`` of each usable entry, the next cursor, the skip reasons."""
    items, cursor = _page(body, "hosts")
    out: list[tuple[str, int | None, str]] = []
    skipped: list[str] = []
    for item in items:
        name = item.get("hostname") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or len(name) > 253:
            skipped.append("bad_hostname")
            continue
        count = item.get("accountCount")
        accounts = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
        status = item.get("status")
        out.append((name, accounts, status if isinstance(status, str) else "active"))
    return out, cursor, skipped
