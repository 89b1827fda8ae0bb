"""Load: many hosts, a burst of new accounts as the reference PDS creates them, mirror on: every host delivered.

Reproduces the conditions of the "silent host stall" (issue 7): 20 synthetic PDS hosts, each
creating its accounts as the reference PDS does (``#identity``, ``#account``, an empty genesis
``#commit``, ``#sync``), then committing, paced at 2,000 events/s over all hosts, into a fresh
relay with the repo mirror on. It asserts delivery, not speed: every event of every host comes
out of the relay's firehose.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from protocol.crypto import PrivateKey
from tests.support.consumer import collect
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.procs import FrameHost, RelayProcess, http_json, wait_until

HOSTS = 20
ACCOUNTS_PER_HOST = 100
COMMITS_PER_HOST = 100
RATE_PER_HOST = 100.0  # events/s; 2,000/s in all
EVENTS_PER_HOST = ACCOUNTS_PER_HOST * 4 + COMMITS_PER_HOST


@pytest.fixture
def hosts() -> Iterator[list[FrameHost]]:
    with ThreadPoolExecutor(8) as pool:
        started = list(pool.map(lambda _: FrameHost(), range(HOSTS)))
    try:
        yield started
    finally:
        for host in started:
            host.stop()


def _accounts(plc: FakePlc, host: FrameHost) -> list[dict[str, str]]:
    out = []
    for _ in range(ACCOUNTS_PER_HOST):
        key = PrivateKey.generate("k256")
        did = new_plc_did()
        plc.put(did, make_did_doc(did, key.public_key().did_key(), host.url))
        out.append({"did": did, "curve": "k256", "key_hex": key.to_bytes().hex()})
    return out


def _hold(host: FrameHost, accounts: list[dict[str, str]]) -> int:
    spec = {"accounts": accounts, "commits": COMMITS_PER_HOST, "hold": True, "creation": True}
    return int(http_json(f"{host.url}/control/generate", spec, timeout=300)["frames"])


@pytest.mark.slow
def test_burst_of_new_accounts_on_many_hosts_is_delivered_whole(
    tmp_path: Path, db_url: str, plc: FakePlc, hosts: list[FrameHost]
) -> None:
    dids_of: dict[str, set[str]] = {}
    with ThreadPoolExecutor(4) as pool:
        specs = [_accounts(plc, host) for host in hosts]
        counts = list(pool.map(_hold, hosts, specs))
    assert counts == [EVENTS_PER_HOST] * HOSTS
    for host, accounts in zip(hosts, specs, strict=True):
        dids_of[host.hostname] = {a["did"] for a in accounts}
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url).start()
    try:
        for host in hosts:
            relay.request_crawl(host.hostname)
        wait_until(lambda: all(h.status()["subscribers"] == 1 for h in hosts), 30, "every host subscribed")
        for host in hosts:
            http_json(f"{host.url}/control/release", {"rate": RATE_PER_HOST})
        total = HOSTS * EVENTS_PER_HOST
        try:
            wait_until(lambda: relay.metric("skyrelay_last_seq") >= total, 45, "every event sequenced", interval=0.5)
        except TimeoutError:  # the per-host count below says which hosts fell short
            assert relay.proc is not None
            os.kill(relay.proc.pid, signal.SIGUSR1)  # every greenlet's stack into the relay log
            wait_until(lambda: "stack dump requested" in relay.log_path.read_text(errors="replace"), 10, "stacks")
        got = collect(relay.ws_url, cursor=0, count=total, timeout=20)
        host_of = {did: hostname for hostname, dids in dids_of.items() for did in dids}
        per_host: Counter[str] = Counter(host_of[b.get("repo") or b["did"]] for _, b in got)
        short = {h: per_host[h] for h in dids_of if per_host[h] != EVENTS_PER_HOST}
        stacks = relay.log_path.read_text(errors="replace").partition("stack dump requested")[2][:20000]
        assert not short, f"hosts short of {EVENTS_PER_HOST} events: {short}\n{stacks}"
        kinds: Counter[Any] = Counter(h.get("t") for h, _ in got)
        assert kinds == {
            "#identity": HOSTS * ACCOUNTS_PER_HOST,
            "#account": HOSTS * ACCOUNTS_PER_HOST,
            "#sync": HOSTS * ACCOUNTS_PER_HOST,
            "#commit": HOSTS * (ACCOUNTS_PER_HOST + COMMITS_PER_HOST),
        }
    finally:
        relay.stop()
