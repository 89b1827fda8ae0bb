"""Benchmark of the repo mirror (store.carstore): slice writes/s, full-repo read latency, compaction throughput.

Usage: python scripts/bench_mirror.py [--quick] [--postgres URL] [--dir DIR] [--no-fsync]

(a) ingest: batches of ``--batch`` single-commit slices (real signed commits of ~5 blocks)
    from ``--accounts`` accounts, written with ``write_slices`` (one pack file, its fsync and its
    directory's, and one metadata transaction per batch; or one syncfs instead of the fsyncs);
    slices/s, MiB/s and per-batch latency, in two halves.
(b) read: a ``--records``-record repo written as 10 slices: ``load_blocks`` and a full repo
    CAR (``repo_car``) before and after compaction, median of several calls.
(c) compaction: that repo (10 slices) and one account of ``--commits`` single-record commits
    with updates and deletes (many small slices): blocks/s and MiB/s read.
(d) XRPC read API (``web.xrpc_repo`` through the Flask test client, no sockets): getRepo of a
    ``--records``-record repo from 10 slices and compacted, getRepo ``since`` diffs, getRecord,
    getLatestCommit, and a listRepos page of 1,000 accounts (one head query per account).

The metadata database is SQLite beside the files unless ``--postgres`` names a server
(a temporary schema is created there and dropped). Files go to a temporary folder under
``--dir``. ``time_calls``/``build_repo`` are meant for reuse by the getRepo HTTP benchmark.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import peewee

from actors.relay_reads import SyncReads
from protocol.car import read_car
from protocol.crypto import PrivateKey
from protocol.frames import CommitEvent
from protocol.repo_writer import RepoWriter, Write
from protocol.syntax import make_tid
from store.accounts import AccountRow, upsert_accounts
from store.carstore import CarStore, SliceWrite
from store.db import open_database
from store.migrations import apply_migrations
from web.app import create_app
from web.xrpc_repo import repo_blueprint

KEY = PrivateKey.generate("k256")


def slice_of(event: CommitEvent, data_cid: bytes) -> SliceWrite:
    """The ``SliceWrite`` an accepted ``#commit`` event becomes."""
    car = read_car(event.blocks)
    return SliceWrite(event.repo, event.rev, event.since, event.commit, data_cid, list(car.blocks.items()))


def build_repo(did: str, records: int, commits: int = 10) -> tuple[RepoWriter, list[SliceWrite]]:
    """An account of ``records`` distinct records created in ``commits`` equal commits, and its slices."""
    writer = RepoWriter(did, KEY)
    slices = []
    per = max(1, records // commits)
    for c in range(0, records, per):
        writes = [
            Write(
                "create", f"app.bsky.feed.post/{c + i:013d}", {"$type": "app.bsky.feed.post", "text": f"post {c + i}"}
            )
            for i in range(min(per, records - c))
        ]
        slices.append(slice_of(writer.commit(writes), writer.data))
    return writer, slices


def time_calls(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """(median, max) seconds of ``n`` calls of ``fn``."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), max(samples)


@contextmanager
def metadata_db(tmp: Path, postgres: str | None) -> Iterator[peewee.Database]:
    if not postgres:
        db = open_database(f"sqlite:///{tmp / 'carstore.sqlite'}")
        yield db
        db.close()
        return
    import psycopg2

    schema = "bench_" + uuid.uuid4().hex[:10]
    conn = psycopg2.connect(postgres)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in postgres else "?"
    db = open_database(f"{postgres}{sep}options={quote('-csearch_path=' + schema)}")
    try:
        yield db
    finally:
        db.close_all() if hasattr(db, "close_all") else db.close()
        conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()


def ingest_slices(n_accounts: int, total: int, rng: random.Random) -> list[SliceWrite]:
    """``total`` single-commit slices spread over ``n_accounts`` accounts (revs increase per account).

    Real commits are made for a few template accounts and re-addressed to the others: a
    slice's cost to store depends on its size, not on whose it is.
    """
    templates = []
    writer = RepoWriter("did:plc:template", KEY)
    for i in range(200):
        path = f"app.bsky.feed.post/{i:013d}"
        templates.append(slice_of(writer.commit([Write("create", path, {"text": "x" * 200})]), writer.data))
    base_us = time.time_ns() // 1000
    out = []
    for i in range(total):
        t = templates[i % len(templates)]
        did = f"did:plc:bench{rng.randrange(n_accounts):08d}"
        out.append(SliceWrite(did, make_tid(base_us + i, 0), None, t.commit_cid, t.data_cid, t.blocks))
    return out


def bench_ingest(store: CarStore, slices: list[SliceWrite], batch: int, label: str) -> None:
    per_batch = []
    start = time.perf_counter()
    for b in range(0, len(slices), batch):
        t0 = time.perf_counter()
        store.write_slices(slices[b : b + batch])
        per_batch.append(time.perf_counter() - t0)
    secs = time.perf_counter() - start
    size = sum(len(blk) + len(cid) for s in slices for cid, blk in s.blocks)
    print(
        f"  {label:<34} {len(slices) / secs:>9,.0f} slices/s  {size / secs / 2**20:6.1f} MiB/s"
        f"  batch of {batch}: median {statistics.median(per_batch) * 1e3:.1f} ms, max {max(per_batch) * 1e3:.1f} ms"
    )


def store_big_repo(store: CarStore, records: int, did: str = "did:plc:bigrepo") -> tuple[RepoWriter, int]:
    """Write a ``records``-record repo into ``store`` as 10 slices; (its writer, slice count).

    The getRepo HTTP benchmark can serve this account from the same store and time requests
    with ``time_calls``.
    """
    writer, slices = build_repo(did, records)
    store.write_slices(slices)
    return writer, len(slices)


def bench_read_and_compact(store: CarStore, records: int, commits: int) -> None:
    writer, n_slices = store_big_repo(store, records)
    did = writer.did
    n = 5
    med, worst = time_calls(lambda: store.load_blocks(did), n)
    print(f"  load_blocks, {n_slices} slices         {med * 1e3:8.1f} ms median  {worst * 1e3:.1f} ms max")
    med, worst = time_calls(lambda: store.repo_car(did), n)
    print(f"  repo_car (assembled), {n_slices} slices {med * 1e3:8.1f} ms median  {worst * 1e3:.1f} ms max")
    before = store.repo_car(did)
    stats = store.compact(did)
    mib = stats.bytes_before / 2**20
    print(
        f"  compact {records:,}-record repo          {stats.seconds * 1e3:8.1f} ms  "
        f"{stats.blocks_before / stats.seconds:,.0f} blocks/s  {mib / stats.seconds:.1f} MiB/s read"
        f"  ({stats.slices_before} -> 1 slices, {stats.bytes_before:,} -> {stats.bytes_after:,} B)"
    )
    assert store.repo_car(did) == before, "repo CAR changed by compaction"
    med, worst = time_calls(lambda: store.load_blocks(did), n)
    print(f"  load_blocks, compacted              {med * 1e3:8.1f} ms median  {worst * 1e3:.1f} ms max")
    med, worst = time_calls(lambda: store.repo_car(did), n)
    print(f"  repo_car, compacted (file served)   {med * 1e3:8.1f} ms median  {worst * 1e3:.1f} ms max")

    writer = RepoWriter("did:plc:manycommits", KEY)
    rng = random.Random(7)
    live: list[str] = []
    small = []
    for i in range(commits):
        roll = rng.random()
        if live and roll < 0.2:
            w = Write("update", rng.choice(live), {"text": f"edit {i}"})
        elif live and roll < 0.3:
            w = Write("delete", live.pop(rng.randrange(len(live))))
        else:
            live.append(f"app.bsky.feed.post/{i:013d}")
            w = Write("create", live[-1], {"text": f"post {i}"})
        small.append(slice_of(writer.commit([w]), writer.data))
    for b in range(0, len(small), 100):
        store.write_slices(small[b : b + 100])
    stats = store.compact(writer.did)
    mib = stats.bytes_before / 2**20
    print(
        f"  compact {commits:,} one-op commits         {stats.seconds * 1e3:8.1f} ms  "
        f"{stats.blocks_before / stats.seconds:,.0f} blocks/s  {mib / stats.seconds:.1f} MiB/s read"
        f"  ({stats.slices_before} -> 1 files, {stats.bytes_before:,} -> {stats.bytes_after:,} B)"
    )


class _ApiServices:
    def __init__(self, blueprint: Any) -> None:
        self._blueprint = blueprint

    def health(self) -> bool:
        return True

    def blueprints(self) -> list[Any]:
        return [self._blueprint]


def bench_repo_api(tmp: Path, car_db: peewee.Database, records: int) -> None:
    """(d): the sync read endpoints over a carstore, timed through the Flask test client."""
    main_db = open_database(f"sqlite:///{tmp / 'relay.sqlite'}")
    apply_migrations(main_db)
    store = CarStore(tmp / "carstore", car_db, fsync=False)
    store.open()
    writer, slices = build_repo("did:plc:apirepo", records)
    store.write_slices(slices)
    template = RepoWriter("did:plc:template", KEY)
    small = slice_of(
        template.commit([Write("create", "app.bsky.feed.post/3kaaaaaaaaaaa", {"text": "x"})]), template.data
    )
    others = [SliceWrite(f"did:plc:list{i:06d}", small.rev, None, small.commit_cid, small.data_cid, small.blocks)
              for i in range(1000)]  # fmt: skip
    store.write_slices(others)
    accounts = [AccountRow(s.did, None, "active", "active", s.rev, s.commit_cid, s.data_cid, False) for s in others]
    accounts.append(AccountRow(writer.did, None, "active", "active", writer.rev, writer.commit_cid, writer.data, False))
    with main_db.connection_context(), main_db.atomic():
        upsert_accounts(main_db, accounts)
    client = create_app(_ApiServices(repo_blueprint(reads=SyncReads(main_db, store)))).test_client()
    did = writer.did

    def get(method: str, **params: Any) -> bytes:
        resp = client.get(f"/xrpc/com.atproto.sync.{method}", query_string=params)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return bytes(resp.data)

    rkey = sorted(writer.records)[len(writer.records) // 2].split("/")[1]
    half = slices[len(slices) // 2 - 1].rev
    full = (f"getRepo, {len(slices)} slices (assembled)", lambda: get("getRepo", did=did))
    since = (f"getRepo since, last {len(slices) // 2} slices", lambda: get("getRepo", did=did, since=half))
    record = ("getRecord", lambda: get("getRecord", did=did, collection="app.bsky.feed.post", rkey=rkey))
    cases: list[tuple[str, Callable[[], bytes]]] = [
        full,
        since,
        ("getRepo since head (root only)", lambda: get("getRepo", did=did, since=writer.rev)),
        record,
        ("getLatestCommit", lambda: get("getLatestCommit", did=did)),
        ("listRepos, limit=1000", lambda: get("listRepos", limit=1000)),
    ]
    print(f"  {records:,}-record repo: getRepo CAR of {len(get('getRepo', did=did)):,} bytes")
    for label, fn in cases:
        med, worst = time_calls(fn, 7)
        print(f"  {label:<38} {med * 1e3:8.1f} ms median  {worst * 1e3:.1f} ms max")
    store.compact(did)
    for label, fn in [("getRepo, compacted (file served)", full[1]), (since[0] + ", compacted", since[1]),
                      ("getRecord, compacted", record[1])]:  # fmt: skip
        med, worst = time_calls(fn, 7)
        print(f"  {label:<38} {med * 1e3:8.1f} ms median  {worst * 1e3:.1f} ms max")
    store.close()
    main_db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--postgres", default=None, help="PostgreSQL URL for the metadata (default: SQLite)")
    parser.add_argument("--dir", default=None, help="where the temporary folder goes")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (shows the cost of durability)")
    parser.add_argument("--slices", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--commits", type=int, default=1_000)
    args = parser.parse_args()
    if args.quick:
        args.slices, args.accounts, args.records, args.commits = 2_000, 500, 1_000, 200

    rng = random.Random(1)
    slices = ingest_slices(args.accounts, args.slices, rng)
    print(f"repo mirror benchmark (metadata: {'PostgreSQL' if args.postgres else 'SQLite'})")
    print("== (a) ingest: write_slices")
    methods = [("none", False)] if args.no_fsync else [("fsync", True), ("syncfs", True)]
    for method, fsync in methods:
        with (
            tempfile.TemporaryDirectory(prefix="bench-mirror-", dir=args.dir) as tmp,
            metadata_db(Path(tmp), args.postgres) as db,
        ):
            store = CarStore(
                Path(tmp) / "carstore", db, fsync=fsync, sync_method="syncfs" if method == "syncfs" else "auto"
            )
            store.open()
            label = f"durable ({method})" if fsync else "no fsync"
            half = len(slices) // 2
            bench_ingest(store, slices[:half], args.batch, f"{label}, first half")
            bench_ingest(store, slices[half:], args.batch, f"{label}, second half")
            store.close()
    print("== (b) read and (c) compaction")
    with (
        tempfile.TemporaryDirectory(prefix="bench-mirror-", dir=args.dir) as tmp,
        metadata_db(Path(tmp), args.postgres) as db,
    ):
        store = CarStore(Path(tmp) / "carstore", db, fsync=not args.no_fsync)
        store.open()
        bench_read_and_compact(store, args.records, args.commits)
        store.close()
    print("== (d) XRPC read API (Flask test client)")
    with (
        tempfile.TemporaryDirectory(prefix="bench-mirror-", dir=args.dir) as tmp,
        metadata_db(Path(tmp), args.postgres) as db,
    ):
        bench_repo_api(Path(tmp), db, args.records)


if __name__ == "__main__":
    main()
