"""Hostile or broken upstreams, as a real frame host (and a real hostile HTTP server) would act.

A frame that breaks the parser is dropped and counted, the cursor moves past it, and the host's
later events arrive (it used to crash the subscriber, which re-read the same frame forever).
A bug while verifying one frame drops that frame only (traceback logged once per reason per host).
A PDS whose getRepo answers a malformed HTTP status line fails that backfill and gives its slot
back (it used to keep the slot forever, so no other account was ever backfilled).
"""

# ruff: noqa: F811  (pytest fixtures imported from test_upstream_behaviour are parameters here)
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import libipld

from tests.integration.test_upstream_behaviour import (  # noqa: F401  (fixtures)
    Feed,
    crawl,
    dropped,
    firehose,
    frame_hosts,
    host_status,
    make_writers,
    new_host,
    relays,
    start_relay,
    subscriptions,
)
from tests.support.fake_plc import FakePlc
from tests.support.procs import REPO_ROOT, FrameHost, RelayProcess, http_json, wait_until


def with_op_action(frame: bytes, action: object) -> bytes:
    header, body = libipld.decode_dag_cbor_multi(frame)
    body["ops"][0]["action"] = action
    return bytes(libipld.encode_dag_cbor(header)) + bytes(libipld.encode_dag_cbor(body))


def test_an_op_action_that_is_a_list_or_map_is_dropped_and_the_host_goes_on(
    tmp_path: Path,
    plc: FakePlc,
    new_host: Callable[[], FrameHost],
    relays: list[RelayProcess],
) -> None:
    host = new_host()
    writers = make_writers(plc, host, 1)
    feed = Feed(writers)
    relay = start_relay(relays, tmp_path, plc)
    crawl(relay, host)
    good = feed.genesis()
    bad = [with_op_action(f, ["create"]) for f in feed.posts_round_robin(1)]
    bad += [with_op_action(f, {"create": 1}) for f in feed.posts_round_robin(1)]
    # the two hostile frames took two posts of the real repo: the next commit is a gap, still valid
    after = feed.posts_round_robin(3)
    host.push(good + bad + after)

    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 4, 20, "the events after the hostile frames")
    bodies = firehose(relay, 4)
    assert [b["seq"] for b in bodies] == [1, 2, 3, 4]
    assert dropped(relay, "bad_field") == 2
    assert "subscriber reader crashed" not in relay.log()
    assert len(subscriptions(host)) == 1  # never reconnected
    wait_until(lambda: host_status(relay, host.hostname)["seq"] == 6, 20, "the cursor past every frame")
    assert relay.stop() == 0


def test_a_getrepo_with_a_malformed_status_line_gives_its_backfill_slot_back(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    broken, healthy = make_writers(plc, host, 2)
    # one backfill slot in all: a slot lost to the broken PDS answer would stop every later backfill
    env = {"SKYRELAY_BACKFILL_CONCURRENCY": "1", "SKYRELAY_BACKFILL_PER_HOST": "1"}
    relay = start_relay(relays, tmp_path, plc, env)
    crawl(relay, host)
    http_json(f"{host.url}/control/broken_getrepo?did={broken.did}", {})
    feed = Feed([broken, healthy])
    for writer in (broken, healthy):
        writer.commit([], 0)  # the genesis the relay never sees: both accounts are first seen mid-history
    host.push(feed.posts_round_robin(1, [broken]))
    wait_until(lambda: broken.did in host.repo_fetches(), 20, "the broken account's backfill")
    wait_until(lambda: relay.metric("skyrelay_mirror_backfills_total", result="failed") >= 1, 20, "a failed backfill")

    frames = feed.posts_round_robin(1, [healthy])
    host.upload_repo(healthy.did, healthy.repo_car())
    host.push(frames)
    wait_until(lambda: healthy.did in host.repo_fetches(), 20, "the next account's backfill (a free slot)")
    wait_until(lambda: relay.metric("skyrelay_mirror_backfills_total", result="ok") >= 1, 20, "it to succeed")
    assert "mirror backfill failed did=" + broken.did in relay.log()
    assert relay.stop() == 0


def test_list_hosts_account_count_follows_new_accounts(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    writers = make_writers(plc, host, 5)
    relay = start_relay(relays, tmp_path, plc)
    crawl(relay, host)  # the subscriber starts with 0 accounts: the count used to stay 0
    host.push(Feed(writers).genesis())

    def listed() -> int:
        hosts = http_json(f"{relay.url}/xrpc/com.atproto.sync.listHosts")["hosts"]
        return int(next(h["accountCount"] for h in hosts if h["hostname"] == host.hostname))

    wait_until(lambda: listed() == 5, 20, "listHosts to count the 5 new accounts", interval=0.5)
    assert host_status(relay, host.hostname)["accountCount"] == 5


SUBSCRIBER_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()
    import json
    import logging
    import sys
    import time

    import gevent

    from actors.accounts import AccountState
    from actors.host_subscriber import HostSubscriber, SubscriberConfig
    from actors.messages import AdvanceCursor, PersistEvent
    from actors.verify import Accepted, HostContext

    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    hostname, bad, expected = sys.argv[1], {int(s) for s in sys.argv[2].split(",")}, int(sys.argv[3])

    class Accounts:
        def put(self, state): pass

    class BuggyVerifier:  # raises on some events, as a verifier bug would
        accounts = Accounts()
        def check(self, event, host):
            if event.seq in bad:
                raise RuntimeError(f"verifier bug on seq {event.seq}")
            return Accepted(AccountState(did=event.repo, host_id=host.host_id))

    class Inbox:
        def qsize(self): return 0

    class Sequencer:
        actor_inbox = Inbox()
        told = []
        def tell(self, message): self.told.append(message)

    class Parent:
        def tell(self, message): print("parent told", message, file=sys.stderr)

    sequencer = Sequencer()
    config = SubscriberConfig(max_frame_bytes=1 << 20, max_ops=200, max_queue=1000, cursor_flush_seconds=0.1,
                              insecure=True)
    ref = HostSubscriber.start(host=HostContext(1, hostname), cursor=0, account_count=0, events_per_second=None,
                               verifier=BuggyVerifier(), sequencer=sequencer, parent=Parent(), config=config)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        cursors = [m.upstream_seq for m in sequencer.told if isinstance(m, AdvanceCursor)]
        if cursors and max(cursors) >= expected:
            break
        gevent.sleep(0.05)
    ref.stop()
    print(json.dumps({
        "persisted": [m.upstream_seq for m in sequencer.told if isinstance(m, PersistEvent)],
        "cursor": max([m.upstream_seq for m in sequencer.told if isinstance(m, AdvanceCursor)], default=-1),
    }), flush=True)
    """
)


def test_an_exception_while_verifying_one_frame_drops_it_and_the_host_goes_on(
    plc: FakePlc, new_host: Callable[[], FrameHost]
) -> None:
    host = new_host()
    feed = Feed(make_writers(plc, host, 1))
    host.push(feed.genesis() + feed.posts_round_robin(5))  # seqs 1..6
    proc = subprocess.run(
        [sys.executable, "-c", SUBSCRIBER_SCRIPT, host.hostname, "2,4", "6"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"persisted": [1, 3, 5, 6], "cursor": 6}, proc.stderr
    assert proc.stderr.count("event dropped host=") == 2 and proc.stderr.count("reason=verify_error") == 3
    assert proc.stderr.count("Traceback (most recent call last)") == 1  # once per reason and host
    assert "subscriber reader crashed" not in proc.stderr and "parent told" not in proc.stderr
