"""The rest of the admin API and the ``skyrelay admin`` CLI, against a real relay subprocess.

Public requestCrawl switch and daily limit (an admin crawl bypasses both), consumers, the actor
tree and restarts (identity, mirror, one host, an ingest worker), repo verify / compact / reset /
re-sync, trusted domains; every CLI group with tables and ``--json``; refused requests (no or
wrong credentials, malformed or out-of-range parameters) answered 4xx with nothing changed;
a short admin password refused at start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import websocket

from tests.integration.test_admin_control import PASSWORD, Pds, call, get_post, ok
from tests.support.procs import REPO_ROOT, FrameHost, RelayProcess, http_json, wait_until


def start(tmp_path: Path, db_url: str, plc: Any, **env: str) -> RelayProcess:
    extra = {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, **env}
    return RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=extra).start()


def subscriptions(host: FrameHost) -> int:
    return len(http_json(f"{host.url}/control/subscriptions")["subscriptions"])


def node(tree: dict[str, Any], name: str) -> dict[str, Any] | None:
    if tree["name"] == name:
        return tree
    for child in tree.get("children", []):
        found = node(child, name)
        if found is not None:
            return found
    return None


def test_crawl_switch_daily_limit_consumers_tree_restarts_and_repo_upkeep(
    tmp_path: Path, db_url: str, plc: Any, host: FrameHost
) -> None:
    pds = Pds(host, plc)
    alice = pds.account()
    relay = start(tmp_path, db_url, plc)
    other = FrameHost()
    try:
        # public requestCrawl off: refused; an admin crawl still works
        assert ok(relay, "GET", "/admin/subs/getEnabled") == {"enabled": True}
        ok(relay, "POST", "/admin/subs/setEnabled", query={"enabled": "false"})
        assert ok(relay, "GET", "/admin/subs/getEnabled") == {"enabled": False}
        status, err = get_post(relay, host.hostname)
        assert status == 400 and err["error"] == "Forbidden"
        assert ok(relay, "GET", "/admin/pds/list") == []
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        ok(relay, "POST", "/admin/subs/setEnabled", query={"enabled": "true"})

        # a daily limit of 0 new hosts: a new host is refused, a known one is not
        assert ok(relay, "GET", "/admin/subs/perDayLimit") == {"limit": 50}
        ok(relay, "POST", "/admin/subs/setPerDayLimit", query={"limit": "0"})
        assert ok(relay, "GET", "/admin/subs/perDayLimit") == {"limit": 0}
        status, err = get_post(relay, other.hostname)
        assert status == 400 and err["error"] == "RateLimitExceeded"
        assert get_post(relay, host.hostname)[0] == 200
        assert [r["Host"] for r in ok(relay, "GET", "/admin/pds/list")] == [host.hostname]

        pds.commits(alice, n=3)
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= 3, 20, "alice's commits")

        # consumers: a live firehose client is listed
        ws = websocket.create_connection(f"{relay.ws_url}/xrpc/com.atproto.sync.subscribeRepos?cursor=0", timeout=10)
        try:
            for _ in range(3):
                ws.recv()
            consumers = ok(relay, "GET", "/admin/consumers/list")
            assert len(consumers) == 1 and consumers[0]["remote_addr"].startswith("127.0.0.1")
            assert consumers[0]["events_consumed"] >= 3 and consumers[0]["connected_at"].endswith("Z")
        finally:
            ws.close()

        # the actor tree and restarts
        tree = ok(relay, "GET", "/admin/tree")
        assert tree["name"] == "relay" and node(tree, host.hostname)["state"] == "running"  # type: ignore[index]
        restarts = relay.metric("skyrelay_actor_restarts_total")
        for name in ("identity", "mirror"):
            assert ok(relay, "POST", "/admin/actors/restart", body={"name": name})["name"] == name
        wait_until(lambda: relay.metric("skyrelay_actor_restarts_total") >= restarts + 2, 30, "the restarts")
        wait_until(lambda: all(node(ok(relay, "GET", "/admin/tree"), n)["state"] == "running"  # type: ignore[index]
                               for n in ("identity", "mirror")), 30, "identity and mirror running again")  # fmt: skip
        seen = subscriptions(host)
        ok(relay, "POST", "/admin/actors/restart", body={"name": f"hosts/{host.hostname}"})
        wait_until(lambda: subscriptions(host) > seen and host.status()["subscribers"] == 1, 20, "a resubscription")
        for name, error in (("sequencer", "NotRestartable"), ("nothing", "ActorNotFound"), ("", "InvalidRequest")):
            status, err = call(relay, "POST", "/admin/actors/restart", body={"name": name})
            assert 400 <= status < 500 and err["error"] == error

        # repo upkeep
        verified = ok(relay, "POST", "/admin/repo/verify", query={"did": alice.did})
        assert verified["success"] == "true" and verified["rev"] == alice.rev and verified["records"] == 3
        stats = ok(relay, "POST", "/admin/repo/compact", query={"did": alice.did})["stats"]
        assert stats["did"] == alice.did and stats["outcome"] == "compacted"
        assert ok(relay, "POST", "/admin/repo/verify", query={"did": alice.did})["success"] == "true"
        host.upload_repo(alice.did, alice.repo_car())
        ok(relay, "POST", "/admin/repo/reset", query={"did": alice.did})
        wait_until(lambda: host.repo_fetches().count(alice.did) == 1, 30, "the reset to fetch the repo")
        wait_until(lambda: call(relay, "POST", "/admin/repo/verify", query={"did": alice.did})[0] == 200, 30,
                   "the re-fetched repo")  # fmt: skip
        ok(relay, "POST", "/admin/repo/resync", body={"did": alice.did})
        wait_until(lambda: host.repo_fetches().count(alice.did) == 2, 30, "the re-sync fetch")
        assert ok(relay, "POST", "/admin/pds/resync", query={"host": host.hostname})["queued"] == 1
        wait_until(lambda: host.repo_fetches().count(alice.did) == 3, 30, "the host re-sync fetch")
        unknown = call(relay, "POST", "/admin/repo/compact", query={"did": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"})
        assert unknown[0] == 404

        # trusted domains mark their hosts
        assert ok(relay, "GET", "/admin/subs/trustedDomains") == {"trusted_domains": []}
        ok(relay, "POST", "/admin/subs/setTrustedDomains", body={"domains": ["127.0.0.1"]})
        assert ok(relay, "GET", "/admin/pds/list")[0]["Trusted"] is True
        assert call(relay, "POST", "/admin/subs/setTrustedDomains", body={"domains": ["not a domain"]})[0] == 400
        assert ok(relay, "GET", "/admin/subs/trustedDomains") == {"trusted_domains": ["127.0.0.1"]}
    finally:
        other.stop()
        assert relay.stop() == 0, relay.log()


def test_ingest_worker_and_host_restarts_resubscribe(tmp_path: Path, db_url: str, plc: Any, host: FrameHost) -> None:
    relay = start(tmp_path, db_url, plc, SKYRELAY_INGEST_WORKERS="2")
    try:
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        tree = ok(relay, "GET", "/admin/tree")
        owner = next(w["name"] for w in node(tree, "hosts")["children"] if node(w, host.hostname))  # type: ignore[index]
        seen = subscriptions(host)
        ok(relay, "POST", "/admin/actors/restart", body={"name": owner})
        wait_until(lambda: subscriptions(host) > seen and host.status()["subscribers"] == 1, 30, "a resubscription")
        wait_until(lambda: ok(relay, "GET", "/admin/subs/getUpstreamConns") == [host.hostname], 30, "the new worker")
        seen = subscriptions(host)
        ok(relay, "POST", "/admin/actors/restart", body={"name": f"hosts/{host.hostname}"})  # over the link
        wait_until(lambda: subscriptions(host) > seen and host.status()["subscribers"] == 1, 30, "a host restart")
        assert call(relay, "POST", "/admin/actors/restart", body={"name": "worker-9"})[0] == 404
    finally:
        assert relay.stop() == 0, relay.log()


def test_refused_requests_are_4xx_and_change_nothing(tmp_path: Path, db_url: str, plc: Any, host: FrameHost) -> None:
    relay = start(tmp_path, db_url, plc, SKYRELAY_ADMIN_AUTH_MAX_FAILURES="5")
    try:
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        before = ok(relay, "GET", "/admin/pds/list")

        def state() -> Any:
            paths = (
                "/admin/pds/list",
                "/admin/subs/listDomainBans",
                "/admin/subs/getEnabled",
                "/admin/subs/perDayLimit",
            )
            return [ok(relay, "GET", p) for p in paths]

        initial = state()
        missing = call(relay, "POST", "/admin/pds/block", query={"host": host.hostname}, headers={"Authorization": ""})
        assert missing[0] == 401 and missing[1]["error"] == "AuthRequired"
        bad = [
            ("POST", "/admin/pds/block", {"query": {"host": "nosuchhost.example"}}, 404),
            ("POST", "/admin/pds/block", {"query": {"host": "bad host!"}}, 400),
            ("POST", "/admin/pds/changeLimits", {"body": {"host": host.hostname}}, 400),
            ("POST", "/admin/pds/changeLimits", {"body": {"host": host.hostname, "per_second": 0}}, 400),
            ("POST", "/admin/pds/changeLimits", {"body": {"host": host.hostname, "repo_limit": "many"}}, 400),
            ("POST", "/admin/pds/changeLimits", {"raw": b'{"host": '}, 400),
            ("POST", "/admin/subs/banDomain", {"body": {"domain": ""}}, 400),
            ("POST", "/admin/subs/banDomain", {"body": {"domain": "a..b"}}, 400),
            ("POST", "/admin/subs/banDomain", {"raw": b"[1, 2]"}, 400),
            ("POST", "/admin/subs/unbanDomain", {"body": {"domain": "never-banned.example"}}, 404),
            ("POST", "/admin/subs/setEnabled", {"query": {"enabled": "perhaps"}}, 400),
            ("POST", "/admin/subs/setPerDayLimit", {"query": {"limit": "9" * 30}}, 400),
            ("POST", "/admin/subs/setPerDayLimit", {"query": {"limit": "2000000"}}, 400),
            ("POST", "/admin/repo/takeDown", {"body": {"did": "not-a-did"}}, 400),
            ("POST", "/admin/repo/takeDown", {"raw": b"x" * 70_000}, 413),
            ("GET", "/admin/repo/takedowns", {"query": {"cursor": "-1"}}, 400),
            ("POST", "/admin/subs/killUpstream", {"query": {"host": host.hostname, "block": "sometimes"}}, 400),
            ("GET", "/admin/no/such/route", {}, 404),
        ]
        for method, path, kw, expected in bad:
            status, err = call(relay, method, path, **kw)
            assert status == expected, (path, kw, status, err)
            assert isinstance(err, dict) and set(err) == {"error", "message"}, (path, err)
        assert state() == initial
        assert host.status()["subscribers"] == 1

        # wrong passwords: 401 with WWW-Authenticate, then 429 for this address; nothing changed
        for _ in range(5):
            status, err = call(relay, "POST", "/admin/pds/block", query={"host": host.hostname},
                               headers={"Authorization": "Bearer wrong-password-guess"})  # fmt: skip
            assert status == 401 and err["error"] == "AuthRequired"
        status, err = call(relay, "GET", "/admin/pds/list")
        assert status == 429 and err["error"] == "RateLimitExceeded"
        assert relay.metric("skyrelay_admin_auth_failures_total", reason="throttled") >= 1
        assert before[0]["Blocked"] is False
    finally:
        assert relay.stop() == 0, relay.log()


def cli(relay: RelayProcess, *args: str, password: str | None = PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_")}
    env["SKYRELAY_ADMIN_URL"] = relay.url
    if password is not None:
        env["SKYRELAY_ADMIN_PASSWORD"] = password
    return subprocess.run([sys.executable, "-m", "web.cli", "admin", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def cli_ok(relay: RelayProcess, *args: str) -> str:
    proc = cli(relay, *args)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def test_admin_cli_every_group(tmp_path: Path, db_url: str, plc: Any, host: FrameHost) -> None:
    pds = Pds(host, plc)
    alice = pds.account()
    relay = start(tmp_path, db_url, plc)
    try:
        assert "subscribed to" in cli_ok(relay, "hosts", "add", host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        pds.commits(alice, n=2)
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= 2, 20, "alice's commits")
        table = cli_ok(relay, "hosts", "list")
        assert table.splitlines()[0].split()[:3] == ["HOST", "STATUS", "CONNECTED"] and host.hostname in table
        rows = json.loads(cli_ok(relay, "--json", "hosts", "list"))
        assert rows[0]["Host"] == host.hostname
        assert json.loads(cli_ok(relay, "hosts", "list", "--json"))[0]["Host"] == host.hostname
        assert "account limit 5" in cli_ok(relay, "hosts", "limits", host.hostname, "--repo-limit", "5")
        assert json.loads(cli_ok(relay, "--json", "hosts", "list"))[0]["RepoLimit"] == 5
        out = cli_ok(relay, "hosts", "limits", host.hostname, "--per-hour", "7000", "--per-day", "70000")
        assert "7000 per hour, 70000 per day" in out, out
        [row] = json.loads(cli_ok(relay, "--json", "hosts", "list"))
        assert row["PerHourEventRate"]["Max"] == 7000 and row["PerDayEventRate"]["Max"] == 70_000
        cli_ok(relay, "hosts", "kill", host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 0, 20, "the kill")
        cli_ok(relay, "hosts", "add", host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe again")
        cli_ok(relay, "hosts", "block", host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 0, 20, "the block")
        assert json.loads(cli_ok(relay, "--json", "hosts", "list"))[0]["Blocked"] is True
        cli_ok(relay, "hosts", "unblock", host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "the unblock")

        cli_ok(relay, "domains", "ban", "example.net")
        assert cli_ok(relay, "domains", "list").split() == ["example.net"]
        cli_ok(relay, "domains", "unban", "example.net")
        assert cli_ok(relay, "domains", "list").strip() == "(none)"

        wait_until(lambda: "RepoNotFound" not in cli(relay, "accounts", "takedown", alice.did).stderr, 20,
                   "alice's account row")  # fmt: skip
        assert cli_ok(relay, "accounts", "list").split() == [alice.did]
        assert "reversed" in cli_ok(relay, "accounts", "reverse", alice.did)
        assert json.loads(cli_ok(relay, "--json", "accounts", "list")) == {"dids": []}

        assert "ID" in cli_ok(relay, "consumers", "list") or cli_ok(relay, "consumers", "list").strip() == "(none)"
        actors = cli_ok(relay, "actors", "list")
        assert actors.splitlines()[0].startswith("relay (RelaySupervisor) running") and host.hostname in actors
        assert "identity restarting" in cli_ok(relay, "actors", "restart", "identity")
        host.upload_repo(alice.did, alice.repo_car())
        cli_ok(relay, "repo", "resync", alice.did)
        wait_until(lambda: alice.did in host.repo_fetches(), 20, "the re-sync fetch")
        assert "did=" in cli_ok(relay, "repo", "compact", alice.did)
        assert cli_ok(relay, "repo", "verify", alice.did).startswith(f"ok: rev {alice.rev}, 2 records")
        cli_ok(relay, "repo", "reset", alice.did)
        wait_until(lambda: host.repo_fetches().count(alice.did) == 2, 20, "the reset fetch")
        assert "1 accounts queued" in cli_ok(relay, "hosts", "resync", host.hostname)
        wait_until(lambda: host.repo_fetches().count(alice.did) == 3, 20, "the host re-sync fetch")
        cli_ok(relay, "crawl", "disable")
        assert cli_ok(relay, "crawl", "status").strip() == "public requestCrawl disabled"
        cli_ok(relay, "crawl", "enable")
        cli_ok(relay, "crawl", "per-day", "7")
        assert json.loads(cli_ok(relay, "--json", "crawl", "status")) == {"enabled": True}
        assert ok(relay, "GET", "/admin/subs/perDayLimit") == {"limit": 7}

        refused = cli(relay, "hosts", "block", "nosuchhost.example")
        assert refused.returncode == 1 and "HostNotFound" in refused.stderr
        wrong = cli(relay, "hosts", "list", password="wrong-password-here")
        assert wrong.returncode == 1 and "AuthRequired" in wrong.stderr
        nopass = cli(relay, "hosts", "list", password=None)
        assert nopass.returncode == 2 and "no admin password" in nopass.stderr
    finally:
        assert relay.stop() == 0, relay.log()


def test_short_admin_password_is_refused_at_start_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_")}
    env.update({"SKYRELAY_ADMIN_PASSWORD": "hunter2", "SKYRELAY_DATA_DIR": str(tmp_path / "never")})
    proc = subprocess.run([sys.executable, "-m", "web.cli", "serve", "--bind", "127.0.0.1:0"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "at least 12 characters" in proc.stderr and "hunter2" not in proc.stderr
    assert not (tmp_path / "never").exists()
