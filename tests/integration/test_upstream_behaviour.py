"""End to end: how the relay treats its upstream hosts (frame host subprocesses -> relay subprocess).

Reconnect and resume from the last processed seq; FutureCursor makes it resume live; a host
that refuses connections is backed off, marked offline and retried; the per-host rate limit
throttles without dropping; the per-host account limit drops new accounts past it; an
oversized frame drops the connection and a host that keeps sending it ends up offline.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.crypto import PrivateKey
from protocol.frames import encode_frame, error_frame
from protocol.repo_writer import RepoWriter, Write
from tests.support import forge
from tests.support.consumer import collect
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.framing import pack_frames
from tests.support.procs import REPO_ROOT, FrameHost, RelayProcess, http_json, wait_until

Frames = list[bytes]


class FrameHostOnPort(FrameHost):
    """A frame host on a chosen port (to bring a host "back"), starting with ``history`` already served."""

    def __init__(self, port: int, history: Frames, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"history-{port}-{time.monotonic_ns()}.bin"
        path.write_bytes(pack_frames(history))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.frame_host", "--port", str(port), "--frames", str(path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"frame host did not start on port {port}")
        self.port = port
        self.hostname = f"127.0.0.1:{port}"
        self.url = f"http://{self.hostname}"


def subscriptions(host: FrameHost) -> list[dict[str, Any]]:
    """Every subscribeRepos request the frame host has seen: ``{"cursor": int | None, "answer": ...}``."""
    return list(http_json(f"{host.url}/control/subscriptions")["subscriptions"])


def host_status(relay: RelayProcess, hostname: str) -> dict[str, Any]:
    return dict(http_json(f"{relay.url}/xrpc/com.atproto.sync.getHostStatus?hostname={hostname}"))


def post(i: int, text: str = "") -> Write:
    return Write("create", f"app.bsky.feed.post/3k{i:011d}", {"$type": "app.bsky.feed.post", "text": text or f"p{i}"})


class Feed:
    """Signed events of a few accounts on one host, with the host's upstream seqs."""

    def __init__(self, writers: list[RepoWriter], seq: int = 0) -> None:
        self.writers = writers
        self.seq = seq
        self.posts = 0

    def genesis(self) -> Frames:
        return [self.commit(w, []) for w in self.writers]

    def commit(self, writer: RepoWriter, writes: list[Write]) -> bytes:
        self.seq += 1
        return encode_frame(writer.commit(writes, self.seq))

    def posts_round_robin(self, n: int, writers: list[RepoWriter] | None = None) -> Frames:
        """``n`` one-post commits, taking the writers (default: all of the feed's) in turn."""
        turn = writers or self.writers
        out = []
        for i in range(n):
            self.posts += 1
            out.append(self.commit(turn[i % len(turn)], [post(self.posts)]))
        return out


@pytest.fixture
def frame_hosts() -> Iterator[list[FrameHost]]:
    """Frame hosts a test starts (append them); all stopped afterwards."""
    started: list[FrameHost] = []
    yield started
    for host in started:
        host.stop()


@pytest.fixture
def new_host(frame_hosts: list[FrameHost]) -> Callable[[], FrameHost]:
    def start() -> FrameHost:
        host = FrameHost()
        frame_hosts.append(host)
        return host

    return start


@pytest.fixture
def relays() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.stop()


def start_relay(
    relays: list[RelayProcess], tmp_path: Path, plc: FakePlc, env: dict[str, str] | None = None
) -> RelayProcess:
    relay = RelayProcess(tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}",
                         plc_url=plc.url, extra_env=env).start()  # fmt: skip
    relays.append(relay)
    return relay


def make_writers(plc: FakePlc, host: FrameHost, n: int) -> list[RepoWriter]:
    writers = []
    for _ in range(n):
        key = PrivateKey.generate("k256")
        did = new_plc_did()
        plc.put(did, make_did_doc(did, key.public_key().did_key(), host.url))
        writers.append(RepoWriter(did, key))
    return writers


def crawl(relay: RelayProcess, host: FrameHost) -> None:
    """requestCrawl, then wait for the (live, cursor-less) subscription of a new host."""
    before = len(subscriptions(host))
    assert relay.request_crawl(host.hostname) == {}
    wait_until(lambda: len(subscriptions(host)) > before and host.status()["subscribers"] >= 1, 20, "a subscription")


def firehose(relay: RelayProcess, count: int) -> list[dict[str, Any]]:
    """The relay's whole output (``count`` bodies from cursor 0), checked to end there, seqs contiguous."""
    bodies = [body for _, body in collect(relay.ws_url, cursor=0, count=count, timeout=30)]
    assert [b["seq"] for b in bodies] == list(range(1, count + 1)), relay.log()
    assert collect(relay.ws_url, cursor=count, count=1, timeout=1.0) == [], "more events than expected"
    return bodies


def dropped(relay: RelayProcess, reason: str | None = None) -> float:
    if reason is None:
        return relay.metric("skyrelay_events_dropped_total")
    return relay.metric("skyrelay_events_dropped_total", reason=reason)


# -- 1. reconnect and resume -----------------------------------------------------------------------
def test_dropped_connection_resumes_from_last_processed_seq(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    writers = make_writers(plc, host, 2)
    relay = start_relay(relays, tmp_path, plc)
    crawl(relay, host)
    accounts = [{"did": w.did, "curve": "k256", "key_hex": w.key.to_bytes().hex()} for w in writers]
    spec = {"accounts": accounts, "commits": 400, "hold": True}
    total = int(http_json(f"{host.url}/control/generate", spec)["frames"])
    http_json(f"{host.url}/control/release", {"rate": 250})  # about 1.6 s of stream

    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 100, 20, "the stream to be under way")
    processed_before_drop = int(relay.metric("skyrelay_last_seq"))  # relay seq == upstream seq here
    host.close_subscribers()
    wait_until(lambda: len(subscriptions(host)) >= 2, 20, "the relay to reconnect")
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= total, 30, "the rest of the stream")

    first, again, *more = subscriptions(host)
    assert first == {"cursor": None, "answer": None}  # a new host is read live
    assert again["answer"] is None and more == []
    # it asked to resume after the last event it had handled when the connection dropped: not
    # before it (upstream events again: seq_not_increasing drops), not after it (a gap below)
    assert processed_before_drop <= again["cursor"] < total, again
    bodies = firehose(relay, total)
    assert len({(b["repo"], b["rev"]) for b in bodies}) == total  # every upstream event exactly once
    assert dropped(relay) == 0, relay.log()
    assert relay.metric("skyrelay_upstream_reconnects_total", reason="closed") >= 1
    assert f"upstream connected host={host.hostname} cursor={again['cursor']}" in relay.log()
    assert relay.stop() == 0, relay.log()


# -- 2. FutureCursor -------------------------------------------------------------------------------
def _future_cursor_setup(
    tmp_path: Path, plc: FakePlc, frame_hosts: list[FrameHost], relays: list[RelayProcess]
) -> tuple[RelayProcess, FrameHost, Feed]:
    """A relay that saved cursor 10 for a host now serving a fresh history of 3 events: it resumes live.

    Returns the restarted relay, the new host and its feed (after 10 delivered + 3 live events).
    """
    old = FrameHost()
    frame_hosts.append(old)
    port = old.port
    writers = make_writers(plc, old, 2)
    feed = Feed(writers)
    relay = start_relay(relays, tmp_path, plc)
    crawl(relay, old)
    old.push(feed.genesis() + feed.posts_round_robin(8))
    wait_until(lambda: host_status(relay, old.hostname)["seq"] == 10, 20, "cursor 10 saved")
    assert relay.stop() == 0, relay.log()
    old.stop()

    # the PDS was reset: a fresh, shorter history (another account's 3 events) on the same port
    carol = make_writers(plc, old, 1)[0]
    fresh = Feed([carol])
    history = fresh.genesis() + fresh.posts_round_robin(2)
    host = FrameHostOnPort(port, history, tmp_path / "hosts")
    frame_hosts.append(host)
    relay.start()  # a known host: resumes from its saved cursor
    wait_until(lambda: len(subscriptions(host)) >= 2, 20, "FutureCursor, then a live subscription")
    assert subscriptions(host)[:2] == [{"cursor": 10, "answer": "FutureCursor"}, {"cursor": None, "answer": None}]
    # live from now on: alice and bob carry on; carol's history before the reset is not replayed
    feed.seq = fresh.seq
    host.push(feed.posts_round_robin(3))
    bodies = firehose(relay, 13)
    assert [b["repo"] for b in bodies[10:]] == [w.did for w in (writers[0], writers[1], writers[0])]
    assert carol.did not in {b["repo"] for b in bodies}
    assert dropped(relay) == 0, relay.log()
    return relay, host, feed


def test_future_cursor_resumes_live(
    tmp_path: Path, plc: FakePlc, frame_hosts: list[FrameHost], relays: list[RelayProcess]
) -> None:
    relay, _, _ = _future_cursor_setup(tmp_path, plc, frame_hosts, relays)
    assert "upstream says FutureCursor" in relay.log()
    assert relay.metric("skyrelay_upstream_reconnects_total", reason="requested") >= 1
    assert relay.stop() == 0, relay.log()


def test_cursor_saved_after_future_cursor_is_the_new_one(
    tmp_path: Path, plc: FakePlc, frame_hosts: list[FrameHost], relays: list[RelayProcess]
) -> None:
    relay, host, feed = _future_cursor_setup(tmp_path, plc, frame_hosts, relays)
    # the relay has handled the new host's events up to upstream seq 6; a clean stop saves cursors
    assert host.status()["last_seq"] == 6
    assert relay.stop() == 0, relay.log()
    host.push(feed.posts_round_robin(2))  # seqs 7 and 8, while the relay is down
    relay.start()
    wait_until(lambda: len(subscriptions(host)) >= 3, 20, "the relay to resubscribe")
    assert subscriptions(host)[2] == {"cursor": 6, "answer": None}, subscriptions(host)
    firehose(relay, 15)
    assert host_status(relay, host.hostname)["seq"] == 8
    assert relay.stop() == 0, relay.log()


# -- 3. offline and retry --------------------------------------------------------------------------
def test_refusing_host_is_backed_off_marked_offline_and_retried(
    tmp_path: Path, plc: FakePlc, frame_hosts: list[FrameHost], relays: list[RelayProcess]
) -> None:
    old = FrameHost()
    frame_hosts.append(old)
    writers = make_writers(plc, old, 2)
    feed = Feed(writers)
    env = {"SKYRELAY_UPSTREAM_MAX_FAILURES": "2", "SKYRELAY_OFFLINE_RETRY_SECONDS": "2"}
    relay = start_relay(relays, tmp_path, plc, env)
    crawl(relay, old)
    history = feed.genesis() + feed.posts_round_robin(2)
    old.push(history)
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 4, 20, "the first events")

    old.stop()  # connections are refused from now on
    stopped = time.monotonic()
    wait_until(lambda: host_status(relay, old.hostname)["status"] == "offline", 20, "the host to go offline")
    offline = time.monotonic()
    # two refused connections, after backoff delays of about 0.5 s and 1 s (jitter +-20%)
    assert offline - stopped >= 1.0
    assert relay.metric("skyrelay_upstream_reconnects_total", reason="connect_failed") >= 2
    assert f"host offline host={old.hostname}" in relay.log()

    # the PDS comes back on the same port with its history and new events
    new_events = feed.posts_round_robin(3)
    host = FrameHostOnPort(old.port, history + new_events, tmp_path / "hosts")
    frame_hosts.append(host)
    wait_until(lambda: subscriptions(host), 20, "the offline host to be retried")
    retried = time.monotonic()
    assert retried - offline >= 1.5  # offline_retry_seconds = 2, not the fast backoff
    assert subscriptions(host)[0] == {"cursor": 4, "answer": None}
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 7, 20, "events to flow again")
    wait_until(lambda: host_status(relay, host.hostname)["status"] == "active", 10, "the host to be active")
    wait_until(lambda: host_status(relay, host.hostname)["seq"] == 7, 10, "cursor 7 saved")
    firehose(relay, 7)
    assert dropped(relay) == 0, relay.log()
    assert relay.stop() == 0, relay.log()


# -- 4. per-host rate limit ------------------------------------------------------------------------
def test_rate_limit_throttles_without_dropping(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    feed = Feed(make_writers(plc, host, 2))
    relay = start_relay(relays, tmp_path, plc, {"SKYRELAY_DEFAULT_HOST_EVENTS_PER_SECOND": "50"})
    crawl(relay, host)
    frames = feed.genesis() + feed.posts_round_robin(198)
    started = time.monotonic()
    host.push(frames)
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 120, 30, "the first 120 events")
    at_120 = time.monotonic()
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 200, 30, "all 200 events")
    done = time.monotonic()
    # 50 events/s sustained after a burst of at most 2 s worth (TokenBucket burst = 2 * rate):
    # unthrottled, 200 events take ~0.1 s here; throttled, >= 2 s in all, and the last 80 >= 1.6 s
    assert done - started >= 1.5, done - started
    assert done - at_120 >= 1.2, done - at_120
    firehose(relay, 200)
    assert dropped(relay) == 0, relay.log()
    assert relay.stop() == 0, relay.log()


# -- 5. per-host account limit ---------------------------------------------------------------------
def test_account_limit_throttles_accounts_past_it(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    alice, bob, carol = make_writers(plc, host, 3)
    feed = Feed([alice, bob, carol])
    relay = start_relay(relays, tmp_path, plc, {"SKYRELAY_DEFAULT_HOST_ACCOUNT_LIMIT": "2"})
    crawl(relay, host)
    host.push(feed.genesis() + feed.posts_round_robin(6))  # 3 events per account
    wait_until(lambda: dropped(relay) >= 3 and relay.metric("skyrelay_last_seq") >= 7, 20, "all 9 events handled")
    bodies = firehose(relay, 7)  # carol's first event is announced as her throttled #account instead
    assert [b.get("repo") or b.get("did") for b in bodies] == [alice.did, bob.did, carol.did] + [alice.did, bob.did] * 2
    assert bodies[2]["active"] is False and bodies[2]["status"] == "throttled"
    assert dropped(relay, "account_throttled") == 3, relay.log()
    assert dropped(relay) == 3
    assert relay.stop() == 0, relay.log()


def test_account_limit_holds_after_restart(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    alice, bob, carol = make_writers(plc, host, 3)
    feed = Feed([alice, bob, carol])
    relay = start_relay(relays, tmp_path, plc, {"SKYRELAY_DEFAULT_HOST_ACCOUNT_LIMIT": "2"})
    crawl(relay, host)
    host.push(feed.genesis() + feed.posts_round_robin(3))
    wait_until(lambda: dropped(relay) >= 2 and relay.metric("skyrelay_last_seq") >= 4, 20, "all 6 events handled")
    assert relay.stop() == 0, relay.log()
    relay.start()
    wait_until(lambda: len(subscriptions(host)) >= 2, 20, "the relay to resubscribe")
    host.push(feed.posts_round_robin(2, [carol, alice]))  # seqs 7 and 8; carol is still one account too many
    wait_until(lambda: host_status(relay, host.hostname)["seq"] == 8, 20, "both events handled")
    repos = [b.get("repo") or b.get("did") for _, b in collect(relay.ws_url, cursor=0, count=7, timeout=10)]
    assert repos == [alice.did, bob.did, carol.did, alice.did, bob.did, alice.did], relay.log()
    assert dropped(relay, "account_throttled") == 1  # carol's post after the restart (the counter restarted)
    assert host_status(relay, host.hostname)["accountCount"] == 3  # throttled accounts count too
    assert relay.stop() == 0, relay.log()


def test_cursor_of_trailing_dropped_events_is_saved(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    (alice,) = make_writers(plc, host, 1)
    feed = Feed([alice])
    relay = start_relay(relays, tmp_path, plc)
    crawl(relay, host)
    host.push(feed.genesis() + feed.posts_round_robin(2))
    feed.seq += 1
    host.push([encode_frame(forge.bad_signature(alice, [post(99)], feed.seq))])  # seq 4, dropped
    wait_until(lambda: dropped(relay, "bad_signature") == 1, 20, "the forged event to be dropped")
    wait_until(lambda: host_status(relay, host.hostname)["seq"] >= 3, 10, "cursor 3 saved")
    # the cursor flush interval is 0.5 s and the sequencer writes cursors behind every 1 s
    wait_until(lambda: host_status(relay, host.hostname)["seq"] == 4, 5, "cursor 4 saved")
    assert relay.stop() == 0, relay.log()


# -- 6. oversized frame ----------------------------------------------------------------------------
def test_oversized_frame_drops_the_connection_and_the_host_ends_up_offline(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    """A frame over max_frame_bytes cannot be read, so its seq is unknown and cannot be skipped.

    The relay drops the connection (counted as frame_too_large) and reconnects from the last seq it
    handled, which serves the same frame again: each such connection is a failed one, so after
    ``upstream_max_failures`` the host is offline (retried only on the slow offline schedule)
    instead of spinning. The relay and its other hosts carry on.
    """
    poisoned, healthy = new_host(), new_host()
    writers = make_writers(plc, poisoned, 2)
    (dave,) = make_writers(plc, healthy, 1)
    env = {"SKYRELAY_MAX_FRAME_BYTES": "4096", "SKYRELAY_UPSTREAM_MAX_FAILURES": "2",
           "SKYRELAY_OFFLINE_RETRY_SECONDS": "600"}  # fmt: skip
    relay = start_relay(relays, tmp_path, plc, env)
    crawl(relay, poisoned)
    crawl(relay, healthy)
    feed = Feed(writers)
    before = feed.genesis() + feed.posts_round_robin(2)  # seqs 1-4, small frames
    big = feed.commit(writers[0], [post(1000, "x" * 6000)])  # seq 5
    assert len(before[-1]) < 4096 < len(big)
    after = feed.posts_round_robin(2)  # seqs 6-7, never reachable
    poisoned.push([*before, big, *after])

    wait_until(lambda: host_status(relay, poisoned.hostname)["status"] == "offline", 20, "the host to go offline")
    subs = subscriptions(poisoned)
    assert subs == [{"cursor": None, "answer": None}, {"cursor": 4, "answer": None}, {"cursor": 4, "answer": None}]
    assert relay.metric("skyrelay_upstream_reconnects_total", reason="frame_too_large") == 3
    assert host_status(relay, poisoned.hostname)["seq"] == 4
    # it does not spin: no further connection within a second (the next try is in 600 s)
    with pytest.raises(TimeoutError):
        wait_until(lambda: len(subscriptions(poisoned)) > 3, 1.0, "another connection")

    # the relay is alive and its other host still flows
    other = Feed([dave])
    healthy.push(other.genesis() + other.posts_round_robin(2))
    bodies = firehose(relay, 7)
    assert [b["repo"] for b in bodies] == [w.did for w in (writers[0], writers[1], writers[0], writers[1])] + [
        dave.did
    ] * 3
    assert dropped(relay) == 0, relay.log()
    assert relay.stop() == 0, relay.log()


def test_host_answering_only_error_frames_ends_up_offline(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    feed = Feed(make_writers(plc, host, 1))
    env = {"SKYRELAY_UPSTREAM_MAX_FAILURES": "2", "SKYRELAY_OFFLINE_RETRY_SECONDS": "600"}
    relay = start_relay(relays, tmp_path, plc, env)
    crawl(relay, host)
    # after seq 1 the host serves an error frame to every subscriber, whatever its cursor
    host.push([*feed.genesis(), error_frame("InternalServerError", "broken")])
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 1, 20, "the first event")
    # progress, then two connections without progress: ~0.5 s + ~1 s of backoff
    wait_until(lambda: host_status(relay, host.hostname)["status"] == "offline", 8, "the host to go offline")
    assert len(subscriptions(host)) == 3, subscriptions(host)
    assert relay.stop() == 0, relay.log()


# -- look-ups ahead of the stream (actors.lookahead) -------------------------------------------------
def test_new_accounts_behind_a_slow_identity_lookup_are_looked_up_ahead_and_delivered_in_order(
    tmp_path: Path, plc: FakePlc, new_host: Callable[[], FrameHost], relays: list[RelayProcess]
) -> None:
    host = new_host()
    writers = make_writers(plc, host, 6)
    relay = start_relay(relays, tmp_path, plc)
    crawl(relay, host)
    plc.hold()  # the directory is slow: every DID document request waits
    try:
        host.push([encode_frame(w.commit([], i + 1)) for i, w in enumerate(writers)])
        # the first commit waits for its document; the relay reads the five behind it, which have
        # arrived, and asks for their documents meanwhile (one request at a time without look-ahead)
        wait_until(lambda: all(plc.requests_for(w.did) for w in writers), 20, "every DID requested while held")
    finally:
        plc.release()
    bodies = firehose(relay, 6)
    assert [b["repo"] for b in bodies] == [w.did for w in writers]  # verified and sequenced in stream order
    assert all(plc.requests_for(w.did) == 1 for w in writers)  # looked up once each: ahead, then from memory
    assert relay.metric("skyrelay_lookahead_lookups_total", result="done") == 5
    assert dropped(relay) == 0, relay.log()
