"""The repo mirror end to end: a synthetic PDS -> the relay -> the sync read API.

Commits that follow the mirrored head become slices; an account first seen mid-history and
an account with a gap are backfilled from the PDS's getRepo (live commits held meanwhile and
applied after); a deleted account's repo is gone. Checked through the relay's own getRepo.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from protocol.crypto import PrivateKey, load_did_key
from protocol.frames import AccountEvent, encode_frame
from protocol.repo_verify import verify_repo
from protocol.repo_writer import RepoWriter, Write, now_iso
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.procs import FrameHost, RelayProcess, wait_until


def post(i: int) -> Write:
    return Write("create", f"app.bsky.feed.post/3m{i:011d}", {"$type": "app.bsky.feed.post", "text": f"post {i}"})


class Feed:
    def __init__(self, host: FrameHost) -> None:
        self.host = host
        self.seq = 0

    def push(self, *events: Any) -> None:
        self.host.push([encode_frame(e) for e in events])

    def commit(self, writer: RepoWriter, writes: list[Write]) -> Any:
        self.seq += 1
        return writer.commit(writes, self.seq)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def latest_rev(relay: RelayProcess, did: str) -> str | None:
    status, body = get(f"{relay.url}/xrpc/com.atproto.sync.getLatestCommit?did={did}")
    return json.loads(body)["rev"] if status == 200 else None


def assert_mirrors(relay: RelayProcess, writer: RepoWriter) -> None:
    wait_until(lambda: latest_rev(relay, writer.did) == writer.rev, 30, f"the mirror of {writer.did} at {writer.rev}")
    status, car = get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={writer.did}")
    assert status == 200, car
    repo = verify_repo(car, writer.did, load_did_key(writer.key.public_key().did_key()))
    assert repo.commit_cid == writer.commit_cid
    assert repo.records == dict(sorted(writer.records.items()))


def make_writer(plc: FakePlc, host: FrameHost) -> RepoWriter:
    key = PrivateKey.generate("k256")
    did = new_plc_did()
    plc.put(did, make_did_doc(did, key.public_key().did_key(), host.url))
    return RepoWriter(did, key)


def test_mirror_follows_commits_backfills_first_seen_and_gaps(tmp_path: Path, db_url: str, plc: Any, host: Any) -> None:
    relay = RelayProcess(
        tmp_path / "relay",
        database_url=db_url,
        plc_url=plc.url,
        extra_env={"SKYRELAY_ADMIN_PASSWORD": "mirror-admin-s3cret"},
    ).start()
    try:
        relay.request_crawl(host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        feed = Feed(host)
        alice, bob = make_writer(plc, host), make_writer(plc, host)

        # alice from her first commit: every commit is a slice, no fetch
        feed.push(feed.commit(alice, []), *(feed.commit(alice, [post(i)]) for i in range(10)))
        assert_mirrors(relay, alice)
        assert alice.did not in host.repo_fetches()

        # bob first seen mid-history: the mirror fetches his repo, then applies the live commit
        bob.commit([], 0)
        for i in range(15):
            bob.commit([post(100 + i)], 0)
        host.upload_repo(bob.did, bob.repo_car())
        feed.push(feed.commit(bob, [post(200)]))
        assert_mirrors(relay, bob)
        assert bob.did in host.repo_fetches()

        # a gap in alice's history (a commit the relay never saw): passed on, then backfilled
        alice.commit([post(300)], 0)
        gapped = feed.commit(alice, [post(301)])
        host.upload_repo(alice.did, alice.repo_car())
        feed.push(gapped, feed.commit(alice, [Write("delete", post(3).path)]))
        assert_mirrors(relay, alice)
        assert alice.did in host.repo_fetches()
        assert relay.metric("skyrelay_mirror_backfills_total", result="ok") >= 2

        # an operator asks for a re-sync; the host still serves bob's older upload, and a backfill
        # older than the mirror must never move it back
        fetches = host.repo_fetches().count(bob.did)
        request = urllib.request.Request(
            f"{relay.url}/admin/repo/resync",
            data=json.dumps({"did": bob.did}).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic YWRtaW46bWlycm9yLWFkbWluLXMzY3JldA==",
            },  # admin:mirror-admin-s3cret
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read()) == {"did": bob.did, "queued": True}
        wait_until(lambda: host.repo_fetches().count(bob.did) > fetches, 30, "the admin re-sync fetch")
        assert_mirrors(relay, bob)

        # deletion: the repo is gone
        feed.seq += 1
        feed.push(AccountEvent(feed.seq, alice.did, now_iso(), active=False, status="deleted"))
        wait_until(
            lambda: get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={alice.did}")[0] == 400,
            30,
            "alice's repo to be refused",
        )
        _, body = get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={alice.did}")
        assert json.loads(body)["error"] == "RepoNotFound"
        assert_mirrors(relay, bob)  # others unaffected
    finally:
        assert relay.stop() == 0, relay.log()


def test_mirror_replays_the_event_log_after_a_kill(tmp_path: Path, db_url: str, plc: Any, host: Any) -> None:
    """Slices gathered but not yet flushed when the relay dies are read back from the event log.

    The flush interval is an hour, so the commits exist only in the event log (the firehose has
    sent them) when the relay is killed; after the restart the mirror has them all without a
    single getRepo fetch, and one more live commit follows them as a slice.
    """
    env = {"SKYRELAY_MIRROR_FLUSH_SECONDS": "3600"}
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=env).start()
    feed = Feed(host)
    alice = make_writer(plc, host)
    try:
        relay.request_crawl(host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        feed.push(feed.commit(alice, []), *(feed.commit(alice, [post(i)]) for i in range(12)))
        wait_until(lambda: relay.metric("skyrelay_events_accepted_total") >= 13, 30, "the commits to be logged")
        assert latest_rev(relay, alice.did) is None  # nothing flushed yet: only the log has them
    finally:
        relay.kill9()
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url).start()
    try:
        # the replay runs in the mirror's start, beside a server that already answers
        wait_until(lambda: relay.metric("skyrelay_mirror_replayed_events_total") >= 13, 30, "the log replayed")
        wait_until(lambda: latest_rev(relay, alice.did) == alice.rev, 30, "the replayed mirror")
        feed.push(feed.commit(alice, [post(99)]))
        assert_mirrors(relay, alice)
        assert alice.did not in host.repo_fetches()
        assert relay.metric("skyrelay_mirror_backfills_total") == 0
    finally:
        relay.stop()
