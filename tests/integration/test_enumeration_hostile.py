"""Host enumeration against hostile ``listRepos`` servers (real processes): every walk is bounded.

A cursor that loops, a cursor that never ends and a page that is garbage each stop the walk
with a counted reason, after a bounded number of requests; the good entries found before are
kept as accounts and the bad ones are skipped and counted.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.list_proc import ListServer
from tests.support.procs import RelayProcess, wait_until

PASSWORD = "enum-test-password"
MAX_PAGES = 5


@pytest.fixture
def servers() -> Iterator[dict[str, ListServer]]:
    started = {mode: ListServer(mode) for mode in ("loop", "endless", "garbage")}
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def admin_hosts(relay: RelayProcess) -> dict[str, dict[str, object]]:
    req = urllib.request.Request(f"{relay.url}/admin/pds/list", headers={"Authorization": f"Bearer {PASSWORD}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {row["Host"]: row for row in json.loads(resp.read())}


def test_hostile_list_repos_walks_stop_with_a_reason(
    tmp_path: Path, db_url: str, servers: dict[str, ListServer]
) -> None:
    hosts = ",".join(s.hostname for s in servers.values())
    env = {
        "SKYRELAY_CRAWL_HOSTS": hosts,
        "SKYRELAY_ADMIN_PASSWORD": PASSWORD,
        "SKYRELAY_MIRROR_ENABLED": "false",
        "SKYRELAY_ENUMERATE_SCAN_SECONDS": "0.2",
        "SKYRELAY_ENUMERATE_PAGES_PER_SECOND": "100",
        "SKYRELAY_ENUMERATE_MAX_PAGES": str(MAX_PAGES),
    }
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url="http://127.0.0.1:9", extra_env=env).start()
    try:

        def finished() -> bool:
            rows = admin_hosts(relay)
            return all(rows.get(s.hostname, {}).get("EnumerationState") == "stopped" for s in servers.values())

        wait_until(finished, 30, "every hostile walk to stop")
        rows = admin_hosts(relay)
        loop, endless, garbage = (rows[servers[m].hostname] for m in ("loop", "endless", "garbage"))
        assert str(loop["EnumerationError"]).startswith("cursor_loop"), loop
        assert servers["loop"].count() == 3  # (start) -> a -> b -> a again: stopped before storing it
        assert str(endless["EnumerationError"]).startswith("too_many_pages"), endless
        assert servers["endless"].count() == MAX_PAGES
        assert endless["EnumeratedAccounts"] == 2 * MAX_PAGES
        assert str(garbage["EnumerationError"]).startswith("bad_page"), garbage
        assert garbage["EnumeratedAccounts"] == 1  # the one good entry of the first page
        assert relay.metric("skyrelay_enumeration_entries_skipped_total", reason="bad_did") == 4
        for reason in ("cursor_loop", "too_many_pages", "bad_page"):
            assert relay.metric("skyrelay_enumeration_walks_total", result=reason) == 1, relay.log()
        # a stopped walk is not started again by later scans
        scans_before = relay.metric("skyrelay_enumeration_scans_total")
        wait_until(lambda: relay.metric("skyrelay_enumeration_scans_total") >= scans_before + 3, 30, "three scans")
        assert [s.count() for s in servers.values()] == [3, MAX_PAGES, 2]
    finally:
        assert relay.stop() == 0, relay.log()


def test_a_walk_resumes_at_its_stored_cursor_after_kill_9(tmp_path: Path, db_url: str) -> None:
    server = ListServer("endless")
    env = {
        "SKYRELAY_CRAWL_HOSTS": server.hostname,
        "SKYRELAY_ADMIN_PASSWORD": PASSWORD,
        "SKYRELAY_MIRROR_ENABLED": "false",
        "SKYRELAY_ENUMERATE_SCAN_SECONDS": "0.2",
        "SKYRELAY_ENUMERATE_PAGES_PER_SECOND": "20",
        "SKYRELAY_ENUMERATE_MAX_PAGES": "40",
    }
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url="http://127.0.0.1:9", extra_env=env).start()
    try:
        walked = lambda: int(admin_hosts(relay).get(server.hostname, {}).get("EnumeratedAccounts", 0))  # noqa: E731
        wait_until(lambda: walked() >= 6, 30, "a few pages walked")
        relay.kill9()
        before = server.count()
        relay.start()
        wait_until(lambda: admin_hosts(relay)[server.hostname]["EnumerationState"] == "stopped", 60, "the walk's end")
        cursors = server.cursors()
        assert cursors[0] == "" and cursors[before] != ""  # resumed at a stored cursor, not from the start
        # the page in flight at the kill (not stored), or the one after the last page asked for
        assert int(cursors[before - 1] or "0") <= int(cursors[before]) <= int(cursors[before - 1] or "0") + 1
        row = admin_hosts(relay)[server.hostname]
        assert str(row["EnumerationError"]).startswith("too_many_pages")
        assert row["EnumeratedAccounts"] == 2 * 40  # every page stored once: no gap, no duplicate
    finally:
        assert relay.stop() == 0, relay.log()
        server.stop()
