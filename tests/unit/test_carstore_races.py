"""Carstore writers racing each other: a replace or delete that waits on a compaction's transaction.

Compaction commits a new slice for the account; a replace or delete of the same account,
started while that transaction is open, must supersede that slice too once it commits, not
leave it live beside the replacement (or behind a deleted account). On PostgreSQL (read
committed) the rival's statement snapshot predates the compaction's commit, so the two are
ordered by the account's ``car_repo`` row, which each writes first; SQLite serializes writers
anyway. The compaction thread is paused inside its transaction; the rival is let go once it is
waiting on a lock (observed in ``pg_stat_activity``; on SQLite it is let go at once).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest

from protocol.car import read_car
from protocol.crypto import PrivateKey
from protocol.repo_writer import RepoWriter, Write
from store import carstore_schema
from store.carstore import CarStore, SliceWrite
from store.db import open_database

KEY = PrivateKey.generate("k256")
WAIT_S = 30


def post(i: int) -> Write:
    return Write("create", f"app.bsky.feed.post/{i:013d}", {"$type": "app.bsky.feed.post", "text": f"post {i}"})


def commit(writer: RepoWriter, i: int) -> SliceWrite:
    event = writer.commit([post(i)])
    blocks = list(read_car(event.blocks).blocks.items())
    return SliceWrite(writer.did, event.rev, event.since, event.commit, writer.data, blocks)


def whole(writer: RepoWriter) -> SliceWrite:
    blocks = list(read_car(writer.repo_car(), max_blocks=1 << 20).blocks.items())
    assert writer.rev is not None and writer.commit_cid is not None
    return SliceWrite(writer.did, writer.rev, None, writer.commit_cid, writer.data, blocks)


def close(db: peewee.Database) -> None:
    close_all = getattr(db, "close_all", None)
    close_all() if close_all is not None else db.close()


@pytest.fixture
def dbs(db_url: str) -> Iterator[tuple[peewee.Database, peewee.Database]]:
    """The store's database and another connection to watch it with."""
    pair = (open_database(db_url), open_database(db_url))
    yield pair
    for db in pair:
        close(db)


def wait_until_blocked(watch: peewee.Database, did: str) -> None:
    """Return once a session is waiting on a lock in a statement naming ``did`` (PostgreSQL; SQLite: at once)."""
    if isinstance(watch, peewee.SqliteDatabase):
        return
    deadline = time.monotonic() + WAIT_S
    query = "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s"
    while watch.execute_sql(query, (f"%{did}%",)).fetchone()[0] == 0:
        assert time.monotonic() < deadline, "the rival never waited on the compaction"
        time.sleep(0.01)  # polling the server with a deadline, not waiting for work


@pytest.mark.parametrize("rival", ["replace", "delete"])
def test_a_replace_or_delete_waiting_on_a_compaction_supersedes_the_compacted_slice(
    dbs: tuple[peewee.Database, peewee.Database], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rival: str
) -> None:
    db, watch = dbs
    store = CarStore(tmp_path / "carstore", db, fsync=False)
    store.open()
    did = f"did:plc:race{secrets.token_hex(6)}"  # names this test's statements in pg_stat_activity
    writer = RepoWriter(did, KEY)
    for i in range(5):
        store.write_slices([commit(writer, i)])
    fresh = RepoWriter(did, KEY)
    fresh.commit([post(99)])

    in_txn, release = threading.Event(), threading.Event()
    real_insert = carstore_schema.insert_slices
    results: dict[str, Any] = {}

    def insert_slices(database: peewee.Database, rows: Any) -> None:
        real_insert(database, rows)
        if threading.current_thread().name == "compactor":
            in_txn.set()  # the slices it read are superseded, its own inserted: not committed yet
            assert release.wait(WAIT_S)

    def run(name: str, fn: Any) -> threading.Thread:
        def target() -> None:
            try:
                results[name] = fn()
            except BaseException as exc:
                results[name] = exc

        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    monkeypatch.setattr(carstore_schema, "insert_slices", insert_slices)
    compactor = run("compactor", lambda: store.compact(did))
    assert in_txn.wait(WAIT_S)
    other = run(
        "rival", (lambda: store.replace_repo(whole(fresh))) if rival == "replace" else lambda: store.delete_repo(did)
    )
    wait_until_blocked(watch, did)
    release.set()
    for thread in (compactor, other):
        thread.join(WAIT_S)
        assert not thread.is_alive()
    monkeypatch.setattr(carstore_schema, "insert_slices", real_insert)
    assert results["compactor"].outcome == "compacted" and results["rival"] is None, results

    live = db.execute_sql("SELECT path FROM car_slice WHERE NOT superseded AND did = " + db.param, (did,)).fetchall()
    if rival == "replace":
        assert len(live) == 1, "the compacted slice stayed live beside the replacement"
        assert store.load_blocks(did) == dict(whole(fresh).blocks)
    else:
        assert live == [], "the compacted slice outlived the deleted account"
        assert store.head(did) is None
    slices = store.directory / "slices"
    assert {str(p.relative_to(slices)) for p in slices.rglob("*") if p.is_file()} == {str(p) for (p,) in live}
    store.close()
