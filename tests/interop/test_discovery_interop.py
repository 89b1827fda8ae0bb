"""Interop: discovery against the reference PDS (issue 10's evidence).

A host added with accounts that already wrote everything they will write is enumerated
(``listRepos``) and every account is mirrored from the PDS's ``getRepo``, without any new
commit: the relay saw none of their history live.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import postgres_schema
from tests.interop.refpds import ReferenceNetwork
from tests.interop.test_mirror_interop import (
    Account,
    FirehoseWatch,
    assert_same_repo,
    poll,
    start_relay,
    wait_mirrored,
    write_history,
)
from tests.support.procs import RelayProcess

ADMIN_PASSWORD = "discovery-test"
FAST_SCAN = {"SKYRELAY_ENUMERATE_SCAN_SECONDS": "0.5", "SKYRELAY_ADMIN_PASSWORD": ADMIN_PASSWORD}


@pytest.fixture
def carstore_url(db_url: str) -> Iterator[str | None]:
    """On PostgreSQL, a schema of its own for the carstore metadata; on SQLite the relay's default file."""
    if not db_url.startswith("postgresql"):
        yield None
        return
    with postgres_schema(db_url, prefix="c_") as url:
        yield url


def admin_hosts(relay: RelayProcess) -> dict[str, dict[str, object]]:
    req = urllib.request.Request(f"{relay.url}/admin/pds/list", headers={"Authorization": f"Bearer {ADMIN_PASSWORD}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {row["Host"]: row for row in json.loads(resp.read())}


def quiet_accounts(net: ReferenceNetwork, pds: str, count: int) -> list[Account]:
    """Accounts with a history that is already out on the PDS's firehose (a live subscriber sees none of it)."""
    with FirehoseWatch(net.firehose_url(pds, cursor=None)) as watch:
        accounts = [Account.create(net, pds, f"old{i}") for i in range(count)]
        for account in accounts:
            write_history(account, posts=3)
        for account in accounts:
            watch.wait_for("#commit", account.did, rev=account.pds_head()[1])
    return accounts


@pytest.mark.interop
def test_added_host_is_enumerated_and_every_account_mirrored(
    reference_network: ReferenceNetwork, tmp_path: Path, db_url: str, carstore_url: str | None
) -> None:
    net = reference_network
    pds = net.pds_urls[1]
    accounts = quiet_accounts(net, pds, 3)
    relay = start_relay(tmp_path / "relay", db_url, carstore_url, net.plc_url, **FAST_SCAN)
    try:
        hostname = urlsplit(pds).netloc
        assert relay.request_crawl(hostname) == {}  # public requestCrawl: the scan finds the new host
        wait_mirrored(relay, *accounts)  # no account writes anything from here on
        for account in accounts:
            assert_same_repo(relay, account)
            assert f"mirror backfill queued did={account.did} reason=enumerate" in relay.log()
        poll(relay, lambda: admin_hosts(relay)[hostname]["EnumerationState"] == "done", "enumeration done")
        row = admin_hosts(relay)[hostname]
        assert isinstance(row["EnumeratedAccounts"], int) and row["EnumeratedAccounts"] >= len(accounts), row
        assert relay.metric("skyrelay_enumeration_walks_total", result="done") == 1, relay.log()
        assert f"host enumeration finished host={hostname} state=done" in relay.log()
        assert relay.metric("skyrelay_events_dropped_total") == 0, relay.log()
    finally:
        assert relay.stop() == 0, relay.log()
