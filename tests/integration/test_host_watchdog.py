"""The per-host progress watchdog: a connected host whose reader is stuck on one frame is restarted.

A real frame host, a real relay, a PLC stand-in that holds every request: the subscriber is
stuck resolving a new account's identity. The watchdog logs the stall with the reader's stack,
counts it, restarts the subscriber; once the PLC answers again, the frame is read again and
delivered (nothing skipped). And ``kill -USR1`` logs every greenlet's stack.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.frames import encode_frame
from tests.integration.test_upstream_behaviour import host_status, make_writers, subscriptions
from tests.support.consumer import collect
from tests.support.fake_plc import FakePlc
from tests.support.procs import FrameHost, RelayProcess, wait_until


@pytest.fixture
def relay_and_host(tmp_path: Path, plc: FakePlc, host: FrameHost) -> Iterator[tuple[RelayProcess, FrameHost]]:
    relay = RelayProcess(
        tmp_path / "relay",
        database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}",
        plc_url=plc.url,
        extra_env={"SKYRELAY_HOST_STALL_SECONDS": "1"},
    ).start()
    try:
        yield relay, host
    finally:
        relay.stop()


def test_a_host_stuck_on_one_frame_is_reported_restarted_and_the_frame_read_again(
    plc: FakePlc, relay_and_host: tuple[RelayProcess, FrameHost]
) -> None:
    relay, host = relay_and_host
    alice, bob = make_writers(plc, host, 2)
    relay.request_crawl(host.hostname)
    wait_until(lambda: host.status()["subscribers"] == 1, 20, "a subscription")
    host.push([encode_frame(alice.commit([], 1))])
    wait_until(lambda: host_status(relay, host.hostname)["seq"] == 1, 20, "the cursor saved")

    plc.hold()  # bob's identity look-up now hangs (until the fetch's own 5 s timeout)
    try:
        host.push([encode_frame(bob.commit([], 2))])
        wait_until(lambda: relay.metric("skyrelay_host_stalls_total", phase="verify") >= 1, 20, "a stall seen")
    finally:
        plc.release()
    log = relay.log()
    assert f"host stalled host={host.hostname} phase=verify" in log
    assert "actors/identity.py" in log.partition("host stalled")[2]  # where it was stuck
    assert f"host subscriber failed host={host.hostname} error=stalled" in log

    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 2, 30, "bob's genesis delivered after the restart")
    bodies = [b for _, b in collect(relay.ws_url, cursor=0, count=3, timeout=3)]
    assert [(b["repo"], b["seq"]) for b in bodies] == [(alice.did, 1), (bob.did, 2)]
    assert [s["cursor"] for s in subscriptions(host)] == [None, 1]  # resumed before the stuck frame


def test_sigusr1_logs_every_greenlet_stack(relay_and_host: tuple[RelayProcess, FrameHost]) -> None:
    relay, host = relay_and_host
    relay.request_crawl(host.hostname)
    wait_until(lambda: host.status()["subscribers"] == 1, 20, "a subscription")
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGUSR1)

    def dump() -> str:
        return relay.log_path.read_text(errors="replace").partition("stack dump requested")[2]

    wait_until(lambda: "Greenlets" in dump(), 10, "the stacks")
    assert "host_supervisor.py" in dump()  # the watchdog's timer, started before the relay froze its objects
    assert "in _session" in dump(), dump()  # a subscriber's reader, started after
    assert relay.proc.poll() is None  # still running
