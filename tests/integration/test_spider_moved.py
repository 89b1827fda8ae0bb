"""A known account whose DID document moves to a PDS the relay does not follow: the relay follows it there.

A real relay process (in process and with an ingest worker), two frame hosts on loopback and
the fake PLC. The relay follows the first host only; an account there is known (its first
commit is on the firehose). Its DID document then names the second host, and the first host
sends an ``#identity`` for it, which the relay drops as ``wrong_host``. That drop is a hint
to the spider, which resolves the DID again, puts the second host through the requestCrawl
checks and subscribes to it. Without the hint nothing leads the relay there: the account is
known, so meeting its DID again is not news.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.frames import IdentityEvent, encode_frame
from tests.integration.test_upstream_behaviour import crawl, make_writers
from tests.support.fake_plc import FakePlc, make_did_doc
from tests.support.procs import FrameHost, RelayProcess, wait_until

TIME = "2026-01-01T00:00:00.000Z"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_known_account_moving_to_an_unknown_host_is_followed_there(
    tmp_path: Path, plc: FakePlc, host: FrameHost, workers: int
) -> None:
    second = FrameHost()
    (alice,) = make_writers(plc, host, 1)
    env = {"SKYRELAY_INGEST_WORKERS": str(workers), "SKYRELAY_SPIDER_RECHECK_MOVED_SECONDS": "1"}
    relay = RelayProcess(tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}", plc_url=plc.url,
                         extra_env=env).start()  # fmt: skip
    try:
        crawl(relay, host)
        host.push([encode_frame(alice.commit([], 1))])
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= 1, 20, "alice's first commit")
        wait_until(lambda: relay.metric("skyrelay_spider_steps_total", outcome="did_known") >= 1
                   or relay.metric("skyrelay_spider_steps_total", outcome="host_known") >= 1, 20,
                   "the spider to meet alice on a followed host")  # fmt: skip
        assert second.status()["subscribers"] == 0

        plc.put(alice.did, make_did_doc(alice.did, alice.key.public_key().did_key(), second.url))
        seqs = iter(range(2, 1000))

        def followed_there() -> bool:
            # the relay fetches a document again at most every 10 s (identity directory): until then its
            # #identity passes with the old one; each new one is a new chance, as a PDS would send them
            hinted = relay.metric("skyrelay_spider_steps_total", outcome="moved_hint_wrong_host") >= 1
            if second.status()["subscribers"] >= 1 and hinted:  # with a worker: the hint crossed the link
                return True
            host.push([encode_frame(IdentityEvent(seq=next(seqs), did=alice.did, time=TIME))])
            return False

        wait_until(followed_there, 40, "a wrong_host hint and the second host subscribed", interval=1.0)
        assert f"spider discovered host host={second.hostname} did={alice.did} via=moved" in relay.log()
        assert relay.metric("skyrelay_spider_steps_total", outcome="moved_offered") >= 1
        assert relay.metric("skyrelay_spider_steps_total", outcome="host_subscribed") >= 1
    finally:
        relay.stop()
        second.stop()
