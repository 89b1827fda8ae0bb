"""A host that sent nothing before the relay restarted: its events from while the relay was down arrive.

A new host is read live. Once connected, the relay saves cursor 0 for it, so after a restart it
resumes from 0 instead of live again; events the host emitted meanwhile are not lost.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_upstream_behaviour import Feed, crawl, firehose, make_writers, subscriptions
from tests.support.fake_plc import FakePlc
from tests.support.procs import FrameHost, RelayProcess, wait_until


def test_events_of_a_quiet_host_sent_while_the_relay_was_down_are_not_lost(
    tmp_path: Path, plc: FakePlc, host: FrameHost
) -> None:
    writers = make_writers(plc, host, 2)
    db_url = f"sqlite:///{tmp_path / 'relay.sqlite'}"
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url).start()
    try:
        crawl(relay, host)  # read live; the host has sent nothing yet
        wait_until(lambda: "upstream connected host=" + host.hostname in relay.log(), 10, "the connection")
    finally:
        assert relay.stop() == 0
    feed = Feed(writers)
    host.push(feed.genesis() + feed.posts_round_robin(4))  # while the relay is down
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url).start()
    try:
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= 6, 20, "the events sent while it was down")
        assert [b["seq"] for b in firehose(relay, 6)] == [1, 2, 3, 4, 5, 6]
        assert [s["cursor"] for s in subscriptions(host)] == [None, 0]
    finally:
        relay.stop()
