"""Interop: DID lists (issue 10's evidence): export from one relay, import into another, against the reference PDS.

Relay A follows a reference PDS and mirrors its accounts (enumeration); ``skyrelay dids
export`` writes its list; an empty relay B, which walks no host by itself, is given the list
with ``skyrelay dids import`` and must follow the same host and serve the same ``getRepo`` for
every account. Run twice, the import adds nothing. Killed with SIGKILL midway, the relay is
started again and the import run again: every line is stored once, none is missing. A file
with bad lines is imported around them, and each is reported by its number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from protocol.repo_verify import verify_repo
from tests.conftest import postgres_schema
from tests.interop.refpds import ReferenceNetwork
from tests.interop.test_discovery_interop import admin_hosts, quiet_accounts
from tests.interop.test_mirror_interop import Account, poll, start_relay, wait_mirrored
from tests.support.procs import REPO_ROOT, RelayProcess, wait_until
from web.dids_cli import job_name

PASSWORD = "discovery-test"
BASE = {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, "SKYRELAY_ENUMERATE_SCAN_SECONDS": "0.5"}
NO_WALK = {**BASE, "SKYRELAY_ENUMERATE_HOSTS": "false"}  # B learns accounts from the list only


@pytest.fixture
def carstore_urls(db_url: str) -> Iterator[list[str | None]]:
    """Two carstore databases (one per relay) of the same kind as ``db_url``."""
    if not db_url.startswith("postgresql"):
        yield [None, None]
        return
    with postgres_schema(db_url, prefix="c_") as one, postgres_schema(db_url, prefix="d_") as two:
        yield [one, two]


@pytest.fixture
def db_url_b(db_url: str, tmp_path: Path) -> Iterator[str]:
    if not db_url.startswith("postgresql"):
        yield f"sqlite:///{tmp_path / 'b.sqlite'}"
        return
    with postgres_schema(db_url, prefix="b_") as url:
        yield url


def dids(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_")}
    env["SKYRELAY_ADMIN_PASSWORD"] = PASSWORD
    return subprocess.run([sys.executable, "-m", "web.cli", "dids", "--url", relay.url, *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def same_repo(a: RelayProcess, b: RelayProcess, account: Account) -> None:
    ours = [verify_repo(account.relay_repo(r), account.did, account.key) for r in (a, b)]
    assert ours[0].commit_cid == ours[1].commit_cid, account.did
    assert ours[0].records == ours[1].records, account.did
    assert ours[0].blocks.keys() == ours[1].blocks.keys(), account.did


@pytest.mark.interop
def test_export_import_gives_the_same_repos_and_is_idempotent(
    reference_network: ReferenceNetwork, tmp_path: Path, db_url: str, db_url_b: str, carstore_urls: list[str | None]
) -> None:
    net = reference_network
    pds = net.pds_urls[0]
    hostname = urlsplit(pds).netloc
    accounts = quiet_accounts(net, pds, 3)
    a = start_relay(tmp_path / "a", db_url, carstore_urls[0], net.plc_url, **BASE)
    b = start_relay(tmp_path / "b", db_url_b, carstore_urls[1], net.plc_url, **NO_WALK)
    try:
        assert a.request_crawl(hostname) == {}
        wait_mirrored(a, *accounts)
        export = dids(a, "export")
        assert export.returncode == 0, export.stderr
        rows = [json.loads(line) for line in export.stdout.splitlines()]
        mine = {r["did"]: r for r in rows if r["did"] in {acc.did for acc in accounts}}
        assert set(mine) == {acc.did for acc in accounts} and all(r["host"] == hostname for r in mine.values())
        listing = tmp_path / "dids.jsonl"
        listing.write_text(export.stdout)

        first = dids(b, "import", str(listing))
        assert first.returncode == 0, first.stderr + b.log()
        assert f"lines {len(rows):,}: imported {len(rows):,}, already current 0, failed: none" in first.stdout
        assert b.metric("skyrelay_import_lines_total", outcome="imported") == len(rows)
        wait_mirrored(b, *accounts)
        for account in accounts:
            same_repo(a, b, account)
        poll(b, lambda: admin_hosts(b).get(hostname, {}).get("HasActiveConnection") is True, "B subscribed")
        queued = b.log().count("reason=import")

        again = dids(b, "import", str(listing))  # the same file: nothing new
        assert again.returncode == 0, again.stderr
        assert first.stdout == again.stdout
        assert b.log().count("reason=import") == queued
    finally:
        for relay in (a, b):
            assert relay.stop() == 0, relay.log()


@pytest.mark.interop
def test_import_survives_kill_9_and_reports_bad_lines(
    reference_network: ReferenceNetwork, tmp_path: Path, db_url: str, carstore_urls: list[str | None]
) -> None:
    net = reference_network
    pds = net.pds_urls[0]
    hostname = urlsplit(pds).netloc
    accounts = quiet_accounts(net, pds, 2)
    fakes = [f"did:plc:{n:024d}".replace("0", "a").replace("1", "b") for n in range(6000)]
    listing = tmp_path / "dids.jsonl"
    bad_at = {3: "not JSON", 5: "did missing or invalid", 4000: "host missing or invalid"}
    with listing.open("w") as f:
        lines = [json.dumps({"did": d, "host": hostname}) for d in [acc.did for acc in accounts] + fakes]
        lines.insert(2, "{not json")
        lines.insert(4, json.dumps({"did": "nope", "host": hostname}))
        lines.insert(3999, json.dumps({"did": "did:plc:" + "c" * 24, "host": "http://x/y"}))
        f.write("\n".join(lines) + "\n")
    env = {**NO_WALK, "SKYRELAY_ENUMERATE_MAX_BACKFILL_QUEUE": "20"}  # the import goes at the mirror's pace
    relay = start_relay(tmp_path / "c", db_url, carstore_urls[0], net.plc_url, **env)
    try:
        cli = subprocess.Popen([sys.executable, "-m", "web.cli", "dids", "--url", relay.url, "--password", PASSWORD,
                                "import", str(listing)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip

        def midway() -> bool:
            status = http_json_auth(relay, "/admin/dids/import?job=" + job_of(listing))
            return 0 < int(status["lines"]) < len(lines)

        wait_until(midway, 120, "the import to be midway")
        relay.kill9()
        _, err = cli.communicate(timeout=60)
        assert cli.returncode == 1, err
        relay.start()
        out = dids(relay, "import", str(listing))
        assert out.returncode == 0, out.stderr + relay.log()
        status = http_json_auth(relay, "/admin/dids/import?job=" + job_of(listing))
        assert status["lines"] == len(lines)  # every line stored once: no gap, no duplicate
        assert status["failed"] == {"bad_line": len(bad_at)}
        assert status["imported"] + status["current"] == len(lines) - len(bad_at)
        reported = err + out.stderr
        for number, reason in bad_at.items():
            assert f"line {number}: {reason}" in reported, reported
        exported = dids(relay, "export")
        known = {json.loads(x)["did"] for x in exported.stdout.splitlines()}
        assert known >= {acc.did for acc in accounts} | set(fakes)
        wait_mirrored(relay, *accounts)
    finally:
        assert relay.stop() == 0, relay.log()


def job_of(path: Path) -> str:
    return job_name(path)


def http_json_auth(relay: RelayProcess, path: str) -> dict[str, Any]:
    req = urllib.request.Request(relay.url + path, headers={"Authorization": f"Bearer {PASSWORD}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))
