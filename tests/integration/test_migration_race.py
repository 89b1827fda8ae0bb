"""An account migrating between hosts served by different ingest workers: a rollback racing the move is dropped.

The new host's worker verifies the account against SQL, which trails the log by up to a
write-behind (1 s). The sequencer checks every account's rev against the last one it
sequenced, whatever the host, so an older rev sent by the new host right after the move never
reaches the firehose.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.frames import encode_frame
from protocol.repo_writer import RepoWriter
from protocol.syntax import make_tid, tid_to_timestamp_us
from tests.integration.test_admin_control import PASSWORD, ok
from tests.integration.test_upstream_behaviour import make_writers, post
from tests.support.consumer import collect
from tests.support.fake_plc import FakePlc, make_did_doc
from tests.support.procs import FrameHost, RelayProcess, wait_until

WORKERS = 2


def host_workers(tree: dict[str, Any]) -> dict[str, str]:
    """Hostname -> name of the ingest worker whose subtree holds it, from ``/admin/tree``."""
    found: dict[str, str] = {}

    def walk(node: dict[str, Any], worker: str) -> None:
        found[node["name"]] = worker
        for child in node.get("children", []):
            walk(child, worker)

    pool = next(c for c in tree["children"] if c["kind"] == "IngestPool")
    for worker in pool["children"]:
        walk(worker, worker["name"])
    return found


@pytest.fixture
def two_workers_hosts() -> Iterator[tuple[FrameHost, FrameHost]]:
    """Two frame hosts; crawled one after the other, they go to different workers (fewest hosts first)."""
    started = [FrameHost(), FrameHost()]
    try:
        yield started[0], started[1]
    finally:
        for host in started:
            host.stop()


def test_a_rollback_sent_by_the_new_host_right_after_a_migration_is_dropped(
    tmp_path: Path, plc: FakePlc, two_workers_hosts: tuple[FrameHost, FrameHost]
) -> None:
    old, new = two_workers_hosts
    (alice,) = make_writers(plc, old, 1)
    relay = RelayProcess(tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}", plc_url=plc.url,
                         extra_env={"SKYRELAY_INGEST_WORKERS": str(WORKERS),
                                    "SKYRELAY_ADMIN_PASSWORD": PASSWORD}).start()  # fmt: skip
    try:
        for host in (old, new):
            relay.request_crawl(host.hostname)
        wait_until(lambda: old.status()["subscribers"] == 1 and new.status()["subscribers"] == 1, 20, "subscriptions")
        workers = host_workers(ok(relay, "GET", "/admin/tree"))
        assert workers[old.hostname] != workers[new.hostname], workers
        old.push([encode_frame(alice.commit([], 1)), encode_frame(alice.commit([post(1)], 2))])
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= 2, 20, "alice's first commits")

        fork = RepoWriter(alice.did, alice.key)  # the repo as it was at rev 2, to forge an older branch from
        fork.blocks, fork.records = dict(alice.blocks), dict(alice.records)
        fork.data, fork.rev, fork.commit_cid = alice.data, alice.rev, alice.commit_cid
        second = alice.commit([post(2)], 3)
        third = alice.commit([post(3)], 4)
        rollback = fork.commit([post(99)], 1, rev=make_tid(tid_to_timestamp_us(second.rev), 1))
        assert second.rev < rollback.rev < third.rev
        # alice moves to the new host; the old host's worker still has her old identity cached
        plc.put(alice.did, make_did_doc(alice.did, alice.key.public_key().did_key(), new.url))
        old.push([encode_frame(second), encode_frame(third)])
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= 4, 20, "alice's commits up to rev 4")
        new.push([encode_frame(rollback)])  # within the write-behind window

        def handled() -> bool:
            drops = relay.metric("skyrelay_sequencer_dropped_total") + relay.metric("skyrelay_events_dropped_total")
            return drops >= 1 or relay.metric("skyrelay_last_seq") >= 5

        wait_until(handled, 20, "the rollback handled")
        bodies = [b for _, b in collect(relay.ws_url, cursor=0, count=5, timeout=3)]
        assert rollback.rev not in [b["rev"] for b in bodies], relay.log()
        assert [b["seq"] for b in bodies] == [1, 2, 3, 4]
    finally:
        relay.stop()
