"""Accounts past a host's account limit are throttled, and released with what they wrote meanwhile.

A real relay subprocess (in-process ingest and two ingest workers) with a frame host upstream:
the host's second account is announced ``#account`` inactive ``throttled`` on a real firehose
client, getRepoStatus and listRepos say so, its events are dropped and counted (``account_throttled``) and
the host list counts it. Raising the limit announces it active again and re-syncs it, so the
records it wrote while throttled reach the mirror (getRepo) and its next commit reaches the
firehose. The host's own hour and day limits are set through changeLimits too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol.repo_verify import verify_repo
from tests.integration.test_admin_control import PASSWORD, Pds, call, frames_after, get, ok
from tests.support.procs import FrameHost, RelayProcess, wait_until


@pytest.fixture(params=[0, 2], ids=["in-process", "2-workers"])
def relay_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, "SKYRELAY_INGEST_WORKERS": str(request.param),
            "SKYRELAY_DEFAULT_HOST_ACCOUNT_LIMIT": "1"}  # fmt: skip


def repo_status(relay: RelayProcess, did: str) -> dict[str, Any]:
    status, body = get(f"{relay.url}/xrpc/com.atproto.sync.getRepoStatus?did={did}")
    return json.loads(body) if status == 200 else {"error": status}


def listed(relay: RelayProcess, dids: set[str]) -> dict[str, Any] | None:
    """listRepos by DID once it lists all of ``dids`` (None before)."""
    status, body = get(f"{relay.url}/xrpc/com.atproto.sync.listRepos")
    assert status == 200, body
    repos = {r["did"]: r for r in json.loads(body)["repos"]}
    return repos if dids <= set(repos) else None


def mirrored_records(relay: RelayProcess, writer: Any) -> list[str]:
    status, car = get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={writer.did}")
    if status != 200:
        return []
    return sorted(verify_repo(car, writer.did, writer.key.public_key()).records)


def test_account_past_the_limit_is_throttled_then_released_and_recovered(
    tmp_path: Path, db_url: str, plc: Any, host: FrameHost, relay_env: dict[str, str]
) -> None:
    pds = Pds(host, plc)
    alice, bob = pds.account(), pds.account()
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=relay_env).start()
    try:
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        pds.commits(alice)
        [(_, first)] = frames_after(relay, 0, 1)
        assert first["repo"] == alice.did

        # bob is the host's second account: throttled, announced, not dropped silently
        pds.commits(bob)
        [(header, body)] = frames_after(relay, 1, 1)
        assert header["t"] == "#account", relay.log()
        assert body["did"] == bob.did and body["active"] is False and body["status"] == "throttled"
        wait_until(lambda: repo_status(relay, bob.did).get("status") == "throttled", 20, "bob's status in SQL")
        assert repo_status(relay, bob.did)["active"] is False
        repos = wait_until(lambda: listed(relay, {alice.did, bob.did}), 20, "both accounts in listRepos")
        assert repos[bob.did]["active"] is False and repos[bob.did]["status"] == "throttled"
        assert repos[alice.did]["active"] is True and "status" not in repos[alice.did]
        pds.commits(bob, n=2)
        pds.commits(alice)
        [(_, next_frame)] = frames_after(relay, 2, 1)
        assert next_frame["repo"] == alice.did, relay.log()
        wait_until(lambda: relay.metric("skyrelay_events_dropped_total", reason="account_throttled") >= 3, 20,
                   "bob's events counted as throttled")  # fmt: skip
        [row] = ok(relay, "GET", "/admin/pds/list")
        assert row["ThrottledCount"] == 1 and row["RepoLimit"] == 1
        wait_until(lambda: relay.metric("skyrelay_hosts_at_account_limit") == 1, 20, "the at-limit gauge")

        # raising the limit releases him; the re-sync brings what he wrote meanwhile
        host.upload_repo(bob.did, bob.repo_car())
        assert len(bob.records) == 3
        changed = ok(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "repo_limit": 5})
        assert changed["released"] == 1
        [(header, body)] = frames_after(relay, 3, 1)
        assert header["t"] == "#account" and body["did"] == bob.did and body["active"] is True, relay.log()
        assert repo_status(relay, bob.did)["active"] is True
        wait_until(lambda: mirrored_records(relay, bob) == sorted(bob.records), 30, "bob's records in the mirror")
        assert ok(relay, "GET", "/admin/pds/list")[0]["ThrottledCount"] == 0
        wait_until(lambda: relay.metric("skyrelay_hosts_at_account_limit") == 0, 20, "the at-limit gauge")

        # the host's own hour and day limits: stored, listed, and the subscriber (or worker) goes on
        bad = call(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "per_hour": 0})
        assert bad[0] == 400 and bad[1]["error"] == "InvalidRequest"
        own = ok(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "per_hour": 100_000,
                                                                 "per_day": 900_000})  # fmt: skip
        assert (own["per_hour"], own["per_day"], own["repo_limit"]) == (100_000, 900_000, 5)
        [row] = ok(relay, "GET", "/admin/pds/list")
        assert row["PerHourEventRate"]["Max"] == 100_000 and row["PerDayEventRate"]["Max"] == 900_000

        # his next commit follows the mirror's head and reaches the firehose and the mirror
        pds.commits(bob)
        [(_, after)] = frames_after(relay, 4, 1)
        assert after["repo"] == bob.did, relay.log()
        wait_until(lambda: mirrored_records(relay, bob) == sorted(bob.records), 30, "bob's new record")
        assert len(bob.records) == 4
    finally:
        assert relay.stop() == 0, relay.log()


def test_lowered_limit_keeps_accounts_and_a_reversed_takedown_respects_it(
    tmp_path: Path, db_url: str, plc: Any, host: FrameHost
) -> None:
    env = {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, "SKYRELAY_DEFAULT_HOST_ACCOUNT_LIMIT": "2"}
    pds = Pds(host, plc)
    alice, bob = pds.account(), pds.account()
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=env).start()
    try:
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        pds.commits(alice)
        pds.commits(bob)
        assert [body["repo"] for _, body in frames_after(relay, 0, 2)] == [alice.did, bob.did]
        wait_until(lambda: ok(relay, "GET", "/admin/pds/list")[0]["RepoCount"] == 2, 20, "the account recount")
        assert ok(relay, "GET", "/admin/pds/list")[0]["OverLimit"] is False

        # lowered below its count: both stay active, the host is reported over its limit
        ok(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "repo_limit": 1})
        [row] = ok(relay, "GET", "/admin/pds/list")
        assert row["OverLimit"] is True and row["RepoLimit"] == 1 and row["ThrottledCount"] == 0
        assert repo_status(relay, alice.did)["active"] is True and repo_status(relay, bob.did)["active"] is True

        # a takedown reversed while the host has no room: throttled, not active
        ok(relay, "POST", "/admin/repo/takeDown", body={"did": bob.did})
        [(_, down)] = frames_after(relay, 2, 1)
        assert down["did"] == bob.did and down["status"] == "takendown"
        ok(relay, "POST", "/admin/repo/reverseTakedown", body={"did": bob.did})
        [(header, back)] = frames_after(relay, 3, 1)
        assert header["t"] == "#account" and back["did"] == bob.did, relay.log()
        assert back["active"] is False and back["status"] == "throttled"
        assert repo_status(relay, bob.did) == {"did": bob.did, "active": False, "status": "throttled"}
        [row] = ok(relay, "GET", "/admin/pds/list")
        assert row["ThrottledCount"] == 1 and row["OverLimit"] is False

        # room again: raising the limit releases him
        raised = ok(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "repo_limit": 2})
        assert raised["released"] == 1
        [(_, released)] = frames_after(relay, 4, 1)
        assert released["did"] == bob.did and released["active"] is True
    finally:
        assert relay.stop() == 0, relay.log()
