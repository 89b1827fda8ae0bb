"""End to end: a synthetic PDS over real websockets -> the relay (subprocess) -> a firehose consumer.

Good events pass in order with contiguous relay seqs; forged ones between them are dropped and
counted by reason; replay from cursor 0 repeats the same sequence; the relay survives kill -9
with no gap, no duplicate, and resumes its upstream cursor.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import libipld
import pytest

from protocol.car import read_car
from protocol.commit import decode_commit
from protocol.crypto import PrivateKey, load_did_key
from protocol.frames import encode_frame
from protocol.repo_writer import RepoWriter, Write
from tests.support import forge
from tests.support.consumer import collect
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.procs import FrameHost, RelayProcess, http_json, wait_until


def post(i: int) -> Write:
    return Write("create", f"app.bsky.feed.post/3k{i:011d}", {"$type": "app.bsky.feed.post", "text": f"post {i}"})


def make_account(plc: FakePlc, host: FrameHost, n: int, curve: str = "k256") -> RepoWriter:
    key = PrivateKey.generate(curve)  # type: ignore[arg-type]
    did = new_plc_did()
    plc.put(did, make_did_doc(did, key.public_key().did_key(), host.url, handle=f"user{n}.test"))
    return RepoWriter(did, key)


def verify_commit_frames(frames: list[tuple[dict[str, Any], dict[str, Any]]], keys: dict[str, str]) -> None:
    for header, body in frames:
        if header.get("t") != "#commit":
            continue
        car = read_car(body["blocks"])
        commit = decode_commit(car.blocks[body["commit"]])
        assert commit.verify(load_did_key(keys[body["repo"]])), body["repo"]


@pytest.fixture(params=[0, 2], ids=["in-process", "2-workers"])
def workers(request: pytest.FixtureRequest) -> dict[str, str]:
    """Run each spine test with verification in the relay process and in 2 ingest workers."""
    return {"SKYRELAY_INGEST_WORKERS": str(request.param)}


def test_relay_passes_good_events_and_drops_forgeries(
    tmp_path: Path, db_url: str, plc: Any, host: Any, workers: dict[str, str]
) -> None:
    alice = make_account(plc, host, 1, "k256")
    bob = make_account(plc, host, 2, "p256")
    keys = {alice.did: alice.key.public_key().did_key(), bob.did: bob.key.public_key().did_key()}
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=workers).start()
    try:
        assert relay.request_crawl(host.hostname) == {}
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")

        seq = 0
        good: list[tuple[str, int]] = []  # (did, upstream seq) expected downstream, in order
        frames: list[bytes] = []

        def emit(event: Any, ok: bool) -> None:
            frames.append(encode_frame(event))
            if ok:
                good.append((getattr(event, "repo", None) or event.did, event.seq))

        for writer in (alice, bob):
            seq += 1
            emit(writer.commit([], seq), True)
        for i in range(6):
            for writer in (alice, bob):
                seq += 1
                emit(writer.commit([post(i)], seq), True)
        seq += 1
        emit(forge.bad_signature(alice, [post(100)], seq), False)
        seq += 1
        emit(forge.high_s(alice.commit([post(101)], seq), "k256"), False)
        # alice's real repo moved on with post 101 but nobody saw it: the next commit is a gap
        seq += 1
        emit(forge.broken_prev_data(bob.commit([post(102)], seq)), False)
        seq += 1
        emit(forge.tampered_block(bob.commit([post(103)], seq)), False)
        seq += 1
        emit(forge.future_rev_commit(alice, [post(104)], seq), False)
        seq += 1
        stale = bob.commit([post(105)], seq)
        emit(stale, True)
        seq += 1
        emit(stale, False)  # replayed event: seq not increasing upstream
        seq += 1
        emit(dataclasses.replace(stale, seq=seq), False)  # same rev again: rollback
        # a stranger's account hosted elsewhere, but sent by this host
        mallory_key = PrivateKey.generate("k256")
        mallory = RepoWriter(new_plc_did(), mallory_key)
        plc.put(mallory.did, make_did_doc(mallory.did, mallory_key.public_key().did_key(), "https://elsewhere.example"))
        seq += 1
        emit(mallory.commit([], seq), False)
        frames.append(b"\xa2\x01\x02garbage")  # not a frame at all
        for i in range(200, 203):
            for writer in (alice, bob):
                seq += 1
                emit(writer.commit([post(i)], seq), True)
        host.push(frames)

        got = collect(relay.ws_url, cursor=0, count=len(good), timeout=30)
        seen = [(b.get("repo") or b.get("did"), b["seq"]) for _, b in got]
        assert len(seen) == len(good), relay.log()
        assert [s for _, s in seen] == list(range(1, len(good) + 1))  # relay seqs contiguous
        assert [d for d, _ in seen] == [d for d, _ in good]
        verify_commit_frames(got, keys)
        # no extra frames after the last good one
        assert len(collect(relay.ws_url, cursor=len(good), count=1, timeout=1.5)) == 0

        dropped = {r: relay.metric("skyrelay_events_dropped_total", reason=r) for r in (
            "bad_signature", "bad_prev_data", "bad_block_hash", "rev_in_future", "seq_not_increasing",
            "rev_not_newer", "wrong_host", "bad_cbor")}  # fmt: skip
        assert all(v >= 1 for v in dropped.values()), dropped
        assert dropped["bad_signature"] >= 2  # forged key and high-S
        assert relay.metric("skyrelay_accounts_marked_resync_total") >= 1

        # replay from 0 again: the same sequence
        again = collect(relay.ws_url, cursor=0, count=len(good), timeout=30)
        assert [b["seq"] for _, b in again] == [b["seq"] for _, b in got]
        assert [libipld.encode_dag_cbor(b) for _, b in again] == [libipld.encode_dag_cbor(b) for _, b in got]
    finally:
        assert relay.stop() == 0, relay.log()


def test_relay_survives_kill9_without_gap_or_duplicate(
    tmp_path: Path, db_url: str, plc: Any, host: Any, workers: dict[str, str]
) -> None:
    writers = [make_account(plc, host, 10 + i) for i in range(4)]
    accounts = [{"did": w.did, "curve": "k256", "key_hex": w.key.to_bytes().hex()} for w in writers]
    relay = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env=workers).start()
    relay.request_crawl(host.hostname)
    wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
    total = host.generate(accounts, commits=3000)  # a new host is read live, from now on
    # kill -9 in the middle of ingest
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= 300, 60, "some ingest")
    relay.kill9()
    relay.start()
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= total, 120, "ingest to finish after restart")
    got = collect(relay.ws_url, cursor=0, count=total, timeout=60)
    # a wrongly re-read upstream event would show up as one frame too many
    assert collect(relay.ws_url, cursor=total, count=1, timeout=1.5) == []
    seqs = [b["seq"] for _, b in got]
    assert seqs == list(range(1, total + 1)), relay.log()
    upstream = [(b["repo"], b["rev"]) for _, b in got]
    assert len(set(upstream)) == len(upstream)  # no upstream event logged twice
    assert relay.stop() == 0, relay.log()


def test_dead_ingest_worker_is_restarted_without_gap_or_duplicate(
    tmp_path: Path, db_url: str, plc: Any, host: Any
) -> None:
    writers = [make_account(plc, host, 20 + i) for i in range(2)]
    accounts = [{"did": w.did, "curve": "k256", "key_hex": w.key.to_bytes().hex()} for w in writers]
    relay = RelayProcess(
        tmp_path / "relay", database_url=db_url, plc_url=plc.url, extra_env={"SKYRELAY_INGEST_WORKERS": "2"}
    ).start()
    relay.request_crawl(host.hostname)
    wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
    first = host.generate(accounts, commits=400)
    wait_until(lambda: relay.metric("skyrelay_last_seq") >= first, 60, "first batch")
    assert relay.proc is not None
    workers = [int(p) for p in Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: host.status()["subscribers"] == 1 and relay.metric("skyrelay_actor_restarts_total") >= 2,
               60, "workers to restart and resubscribe")  # fmt: skip
    more = host.generate(accounts, commits=300, start_seq=first + 1)
    last_upstream = host.status()["last_seq"]
    status_url = f"{relay.url}/xrpc/com.atproto.sync.getHostStatus?hostname={host.hostname}"
    wait_until(lambda: http_json(status_url)["seq"] >= last_upstream, 60, "the relay to process everything")
    total = int(relay.metric("skyrelay_last_seq"))
    assert total >= first + more - len(accounts)  # at most the second run's genesis commits are refused
    got = collect(relay.ws_url, cursor=0, count=total, timeout=60)
    assert [b["seq"] for _, b in got] == list(range(1, total + 1)), relay.log()
    assert collect(relay.ws_url, cursor=total, count=1, timeout=1.5) == []
    upstream = [(b["repo"], b["rev"]) for _, b in got]
    assert len(set(upstream)) == len(upstream)
    assert relay.stop() == 0, relay.log()
