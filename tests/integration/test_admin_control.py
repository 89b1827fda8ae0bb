"""The control plane end to end: the admin JSON API of a real relay subprocess, with frame hosts upstream.

A takedown is seen as an ``#account`` frame by a real firehose client, the account's later
events are dropped (and counted), getRepo refuses the repo, and all of it survives a restart;
a reversal announces the account active and serves it again. A blocked host and a banned
domain's hosts are disconnected, refused by requestCrawl and stay so across restarts. Host
limits reach a running subscriber (in the relay or an ingest worker). Refused requests
(auth, malformed, out of range) are 4xx and change nothing.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.cid import cid_to_str
from protocol.crypto import PrivateKey
from protocol.frames import encode_frame
from protocol.repo_writer import RepoWriter, Write
from tests.support.consumer import collect
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.procs import FrameHost, RelayProcess, wait_until

PASSWORD = "admin-password-for-tests"


def post(i: int) -> Write:
    return Write("create", f"app.bsky.feed.post/3a{i:011d}", {"$type": "app.bsky.feed.post", "text": f"post {i}"})


def call(relay: RelayProcess, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:  # fmt: skip
    """(status, JSON answer) of an admin API call, authorized with PASSWORD unless ``headers`` say otherwise."""
    url = relay.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if method == "POST" and data is None:
        data = b""
    hdrs = {"Authorization": f"Bearer {PASSWORD}", "Content-Type": "application/json"}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def ok(relay: RelayProcess, method: str, path: str, **kw: Any) -> Any:
    status, answer = call(relay, method, path, **kw)
    assert status == 200, (path, status, answer, relay.log())
    return answer


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Pds:
    """A frame host with accounts in the fake PLC, and a running upstream seq."""

    def __init__(self, host: FrameHost, plc: FakePlc) -> None:
        self.host, self.plc, self.seq = host, plc, 0

    def account(self) -> RepoWriter:
        key = PrivateKey.generate("k256")
        did = new_plc_did()
        self.plc.put(did, make_did_doc(did, key.public_key().did_key(), self.host.url))
        return RepoWriter(did, key)

    def commits(self, *writers: RepoWriter, n: int = 1) -> None:
        frames = []
        for i in range(n):
            for w in writers:
                self.seq += 1
                frames.append(encode_frame(w.commit([post(self.seq * 10 + i)], self.seq)))
        self.host.push(frames)


@pytest.fixture(params=[0, 2], ids=["in-process", "2-workers"])
def workers(request: pytest.FixtureRequest) -> dict[str, str]:
    return {"SKYRELAY_INGEST_WORKERS": str(request.param)}


@pytest.fixture
def relay_env(workers: dict[str, str]) -> dict[str, str]:
    return {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, **workers}


@pytest.fixture
def second_host() -> Iterator[FrameHost]:
    frame_host = FrameHost()
    yield frame_host
    frame_host.stop()


def frames_after(relay: RelayProcess, cursor: int, count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return collect(relay.ws_url, cursor=cursor, count=count, timeout=30)


def test_takedown_announces_drops_refuses_and_reversal_restores(
    tmp_path: Path, db_url: str, plc: Any, host: FrameHost, relay_env: dict[str, str]
) -> None:
    pds = Pds(host, plc)
    alice, bob = pds.account(), pds.account()
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=relay_env).start()
    try:
        assert ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})["success"] == "true"
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        pds.commits(alice, bob, n=2)
        before = frames_after(relay, 0, 4)
        assert len(before) == 4, relay.log()
        last = before[-1][1]["seq"]
        # account rows are written behind (about a second)
        wait_until(lambda: get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={alice.did}")[0] == 200, 20,
                   "alice's repo to be served")  # fmt: skip

        # an unknown account cannot be taken down; nothing is announced
        missing = call(relay, "POST", "/admin/repo/takeDown", body={"did": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"})
        assert missing[0] == 404 and missing[1]["error"] == "RepoNotFound"

        taken = ok(relay, "POST", "/admin/repo/takeDown", body={"did": alice.did})
        assert taken["seq"] == last + 1
        [(header, body)] = frames_after(relay, last, 1)
        assert header["t"] == "#account"
        assert body["did"] == alice.did and body["active"] is False and body["status"] == "takendown"
        sync = f"{relay.url}/xrpc/com.atproto.sync."
        assert alice.commit_cid is not None
        head = cid_to_str(alice.commit_cid)
        for read in (f"getRepo?did={alice.did}", f"getRepo?did={alice.did}&since=2222222222222",
                     f"getLatestCommit?did={alice.did}", f"getBlocks?did={alice.did}&cids={head}",
                     f"getRecord?did={alice.did}&collection=app.bsky.feed.post&rkey=3jzfcijpj2z2a"):  # fmt: skip
            status, err = get(sync + read)
            assert status == 400 and err["error"] == "RepoTakendown", read
        status, repo_status = get(f"{relay.url}/xrpc/com.atproto.sync.getRepoStatus?did={alice.did}")
        assert json.loads(repo_status)["active"] is False
        assert ok(relay, "GET", "/admin/repo/takedowns")["dids"] == [alice.did]

        # alice's later events are dropped and counted; bob's still pass
        dropped_before = relay.metric("skyrelay_events_dropped_total", reason="account_takendown")
        pds.commits(alice, bob, n=3)
        after = frames_after(relay, last + 1, 3)
        assert [b["repo"] for _, b in after] == [bob.did] * 3, relay.log()
        wait_until(
            lambda: relay.metric("skyrelay_events_dropped_total", reason="account_takendown") >= dropped_before + 3,
            20,
            "alice's events to be counted as dropped",
        )
        tail = after[-1][1]["seq"]

        # the takedown is durable: a restart keeps refusing the repo and dropping her events
        assert relay.stop() == 0, relay.log()
        relay.start()
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe again")
        status, err = get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={alice.did}")
        assert status == 400 and err["error"] == "RepoTakendown"
        pds.commits(alice, bob)
        [(_, only)] = frames_after(relay, tail, 1)
        assert only["repo"] == bob.did
        tail = only["seq"]

        reversed_ = ok(relay, "POST", "/admin/repo/reverseTakedown", body={"did": alice.did})
        assert reversed_["seq"] == tail + 1
        [(header, body)] = frames_after(relay, tail, 1)
        assert header["t"] == "#account" and body["did"] == alice.did and body["active"] is True
        assert "status" not in body or body["status"] is None
        status, _ = get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={alice.did}")
        assert status == 200
        assert ok(relay, "GET", "/admin/repo/takedowns")["dids"] == []
        pds.commits(alice)
        [(_, again)] = frames_after(relay, tail + 1, 1)
        assert again["repo"] == alice.did
    finally:
        assert relay.stop() == 0, relay.log()


def test_block_ban_kill_and_limits_reach_the_subscribers(
    tmp_path: Path, db_url: str, plc: Any, host: FrameHost, second_host: FrameHost, relay_env: dict[str, str]
) -> None:
    pds = Pds(host, plc)
    alice, bob = pds.account(), pds.account()
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=relay_env).start()
    try:
        assert relay.request_crawl(host.hostname) == {}
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        wait_until(lambda: ok(relay, "GET", "/admin/subs/getUpstreamConns") == [host.hostname], 20, "conns")

        # limits: one account allowed; a running subscriber applies it at once
        limits = ok(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "repo_limit": 1,
                                                                    "per_second": 500})  # fmt: skip
        assert limits["repo_limit"] == 1 and limits["per_second"] == 500
        [row] = ok(relay, "GET", "/admin/pds/list")
        assert row["Host"] == host.hostname and row["RepoLimit"] == 1 and row["PerSecondEventRate"]["Max"] == 500
        assert row["HasActiveConnection"] is True and row["Blocked"] is False
        pds.commits(alice)
        [(_, first)] = frames_after(relay, 0, 1)
        assert first["repo"] == alice.did
        pds.commits(bob, alice)  # bob would be the host's second account: throttled
        [(_, throttled), (_, second)] = frames_after(relay, 1, 2)
        assert throttled["did"] == bob.did and throttled["status"] == "throttled", relay.log()
        assert second["repo"] == alice.did, relay.log()
        wait_until(lambda: relay.metric("skyrelay_events_dropped_total", reason="account_throttled") >= 1, 20,
                   "bob's event dropped over the account limit")  # fmt: skip
        bad = call(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "repo_limit": -5})
        assert bad[0] == 400
        assert ok(relay, "GET", "/admin/pds/list")[0]["RepoLimit"] == 1

        # kill: disconnected, still registered; an admin crawl subscribes again
        ok(relay, "POST", "/admin/subs/killUpstream", query={"host": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 0, 20, "the upstream connection to close")
        assert ok(relay, "GET", "/admin/pds/list")[0]["Registered"] is True
        again = call(relay, "POST", "/admin/subs/killUpstream", query={"host": host.hostname})
        assert again[0] == 400 and again[1]["error"] == "HostInactive"
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe again")

        # block: disconnected, refused by requestCrawl, and still blocked after a restart
        ok(relay, "POST", "/admin/pds/block", query={"host": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 0, 20, "the blocked host to be disconnected")
        status, err = get_post(relay, host.hostname)
        assert status == 400 and err["error"] == "HostBanned"
        refused = call(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        assert refused[0] == 400 and refused[1]["error"] == "HostBanned"
        assert relay.stop() == 0, relay.log()
        relay.start()
        relay.request_crawl(second_host.hostname)  # handled after every start-up host
        wait_until(lambda: second_host.status()["subscribers"] == 1, 20, "the second host to be subscribed")
        assert host.status()["subscribers"] == 0
        assert {r["Host"]: r["Blocked"] for r in ok(relay, "GET", "/admin/pds/list")}[host.hostname] is True
        ok(relay, "POST", "/admin/pds/unblock", query={"host": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "the unblocked host to be subscribed")

        # a domain ban disconnects every host in it and refuses them; lifting it lets an admin add them
        banned = ok(relay, "POST", "/admin/subs/banDomain", body={"Domain": "127.0.0.1"})
        assert sorted(banned["hosts_disconnected"]) == sorted([host.hostname, second_host.hostname])
        wait_until(lambda: host.status()["subscribers"] + second_host.status()["subscribers"] == 0, 20,
                   "the banned domain's hosts to be disconnected")  # fmt: skip
        assert ok(relay, "GET", "/admin/subs/listDomainBans") == {"banned_domains": ["127.0.0.1"]}
        status, err = get_post(relay, second_host.hostname)
        assert status == 400 and err["error"] == "HostBanned"
        ok(relay, "POST", "/admin/subs/unbanDomain", body={"domain": "127.0.0.1"})
        assert ok(relay, "GET", "/admin/subs/listDomainBans") == {"banned_domains": []}
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": second_host.hostname})
        wait_until(lambda: second_host.status()["subscribers"] == 1, 20, "the second host to be subscribed again")
    finally:
        assert relay.stop() == 0, relay.log()


def get_post(relay: RelayProcess, hostname: str) -> tuple[int, Any]:
    """Public requestCrawl of ``hostname``: (status, answer)."""
    req = urllib.request.Request(
        f"{relay.url}/xrpc/com.atproto.sync.requestCrawl",
        data=json.dumps({"hostname": hostname}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
