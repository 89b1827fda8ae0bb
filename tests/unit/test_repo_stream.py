"""getRepo streamed from the slice files: the same bytes as the CAR assembled in memory, in every slice layout.

Over a real carstore: a repo spread over many commit slices in many pack files, a backfilled
repo with commits on top, after compaction, with a compaction that unlinks the files while a
stream is half sent, with more files than a stream may hold open, and in small chunks. Each
answer is a CAR whose blocks hash to their CIDs, rooted at the head, that verifies as the
writer's repo; and the block index the proofs use follows the slices as they change.
"""

from __future__ import annotations

import random

import pytest

from protocol.car import read_car
from protocol.errors import MissingBlock
from protocol.repo_verify import verify_record_proof, verify_repo
from protocol.repo_writer import RepoWriter, Write
from store import carstore_index, carstore_stream
from store.carstore import CarStore, SliceWrite
from store.carstore_schema import SliceRow, live_slices
from tests.unit.test_xrpc_repo import ALICE, KEY, PUB, Relay, alice, car_of, grow, post, relay

__all__ = ["alice", "relay"]  # the fixtures


def streamed(store: CarStore, did: str) -> bytes:
    stream = store.stream_repo(did)
    assert stream is not None
    try:
        parts = []
        while chunk := stream.next_chunk():
            parts.append(chunk)
    finally:
        stream.close()
    data = b"".join(parts)
    assert len(data) == stream.length
    return data


def check(relay: Relay, w: RepoWriter) -> bytes:
    """getRepo (streamed) equals the in-memory CAR and verifies as the writer's repo at its head."""
    car = car_of(relay.get("getRepo", did=ALICE))
    assert car == relay.store.repo_car(ALICE)
    parsed = read_car(car)  # every block's hash is checked
    assert parsed.roots == (w.commit_cid,)
    repo = verify_repo(car, ALICE, PUB)
    assert repo.commit_cid == w.commit_cid and repo.records == dict(sorted(w.records.items()))
    return car


def test_many_slices_then_compacted(relay: Relay, alice: RepoWriter) -> None:
    assert len({r.path for r in live(relay)}) > 5  # one pack file per write_slices batch
    car = check(relay, alice)
    relay.store.compact(ALICE)
    assert len(live(relay)) == 1
    assert check(relay, alice) == car
    grow(relay.commit, alice, random.Random(9), 3, start=50_000)  # commits on top of the compacted slice
    relay.account(ALICE, w=alice)
    check(relay, alice)


def test_backfill_then_commits(relay: Relay) -> None:
    w = RepoWriter(ALICE, KEY)
    grow(lambda w, writes: w.commit(writes), w, random.Random(2), 30)
    full = read_car(w.repo_car())
    assert w.rev is not None and w.commit_cid is not None
    relay.store.replace_repo(SliceWrite(ALICE, w.rev, None, w.commit_cid, w.data, list(full.blocks.items())))
    relay.account(ALICE, w=w)
    check(relay, w)  # one full slice, its blocks in the PDS's order: served in canonical order
    grow(relay.commit, w, random.Random(3), 5, start=10_000)
    relay.account(ALICE, w=w)
    check(relay, w)


def test_small_chunks_and_too_many_files(relay: Relay, alice: RepoWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = relay.store.repo_car(ALICE)
    monkeypatch.setattr(carstore_stream, "CHUNK_BYTES", 100)
    stream = relay.store.stream_repo(ALICE)
    assert stream is not None
    first = stream.next_chunk()
    assert 100 <= len(first) < len(expected)
    stream.close()
    assert streamed(relay.store, ALICE) == expected
    monkeypatch.setattr(carstore_stream, "MAX_OPEN_FILES", 2)  # assembled in memory instead
    assert streamed(relay.store, ALICE) == expected


def test_a_compaction_while_streaming_does_not_disturb_the_stream(relay: Relay, alice: RepoWriter) -> None:
    expected = relay.store.repo_car(ALICE)
    old_files = {r.path for r in live(relay)}
    stream = relay.store.stream_repo(ALICE)
    assert stream is not None
    try:
        parts = [stream.next_chunk()]
        assert relay.store.compact(ALICE).compacted
        assert not any((relay.store.directory / "slices" / p).exists() for p in old_files)  # unlinked
        while chunk := stream.next_chunk():
            parts.append(chunk)
    finally:
        stream.close()
    assert b"".join(parts) == expected


def test_a_missing_record_is_refused_before_any_byte(relay: Relay) -> None:
    w = RepoWriter(ALICE, KEY)
    event = w.commit([Write("create", "app.bsky.feed.post/3k1", post(1)), Write("create", "app.bsky.feed.post/3k2",
                                                                             post(2))])  # fmt: skip
    lost = w.records["app.bsky.feed.post/3k2"]
    blocks = [(c, b) for c, b in read_car(event.blocks).blocks.items() if c != lost]
    relay.store.write_slices([SliceWrite(ALICE, event.rev, None, event.commit, w.data, blocks)])
    with pytest.raises(MissingBlock):
        relay.store.stream_repo(ALICE)


def test_proofs_follow_the_index_as_slices_change(relay: Relay, alice: RepoWriter) -> None:
    def proven(path: str) -> None:
        collection, rkey = path.split("/")
        car = car_of(relay.get("getRecord", did=ALICE, collection=collection, rkey=rkey))
        assert alice.commit_cid is not None
        assert verify_record_proof(car, ALICE, PUB, path) == alice.records.get(path)

    path = sorted(alice.records)[3]
    proven(path)  # builds the index
    relay.commit(alice, [Write("update", path, post(777))])  # a slice on top: the index is extended
    relay.account(ALICE, w=alice)
    proven(path)
    relay.store.compact(ALICE)  # other slices: rebuilt
    proven(path)
    relay.commit(alice, [Write("delete", path)])
    relay.account(ALICE, w=alice)
    proven(path)  # a proof of absence


def live(relay: Relay) -> list[SliceRow]:
    return live_slices(relay.car_db, ALICE)


def test_the_same_record_under_several_keys_is_sent_once(relay: Relay) -> None:
    w = RepoWriter(ALICE, KEY)
    same = post(5)
    relay.commit(w, [Write("create", f"app.bsky.feed.post/3k{n:011d}", same) for n in range(3)])
    relay.commit(w, [Write("create", f"app.bsky.feed.post/3k{n:011d}", post(n)) for n in range(3, 40)])
    relay.commit(w, [Write("create", "app.bsky.feed.post/3k99999999999", same)])
    relay.account(ALICE, w=w)
    car = check(relay, w)
    assert len(read_car(car).blocks) < len(w.records) + 10  # the shared record once
    relay.store.compact(ALICE)
    assert check(relay, w) == car


def test_sorted_in_runs(relay: Relay, alice: RepoWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(carstore_index, "SORT_RUN", 7)  # many runs to merge, in the index and the stream's measure
    same = post(5)
    relay.commit(alice, [Write("create", f"app.bsky.feed.post/3z{n:011d}", same) for n in range(3)])
    relay.account(ALICE, w=alice)
    check(relay, alice)
    for path in sorted(alice.records)[::17]:
        collection, rkey = path.split("/")
        car = car_of(relay.get("getRecord", did=ALICE, collection=collection, rkey=rkey))
        assert verify_record_proof(car, ALICE, PUB, path) == alice.records[path]
