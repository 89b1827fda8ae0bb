"""Batched cache-miss reads (actors.batch_lookup) over the real store queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import gevent
import gevent.event
import peewee
import pytest

from actors.accounts import AccountCache, AccountState
from actors.batch_lookup import BatchLookup
from store.accounts import AccountRow, load_accounts, upsert_accounts
from store.carstore import CarStore
from store.carstore_schema import RepoHead, insert_repo_heads
from store.db import open_database
from store.identities import IdentityRow, load_identities, save_identities
from store.migrations import apply_migrations
from tests.conftest import REPO_ROOT


def _did(i: int) -> str:
    return f"did:plc:{i:024d}"


@pytest.fixture
def db(db_url: str) -> Iterator[peewee.Database]:
    database = open_database(db_url)
    apply_migrations(database)
    with database.connection_context(), database.atomic():
        upsert_accounts(database, [AccountState(_did(i), None, rev=f"3k{i:06d}").to_row() for i in range(1200)])
    yield database
    database.close()


class Recorder:
    """``load_accounts`` recording the keys of every query; ``gate`` holds the first query until set."""

    def __init__(self, fail: Exception | None = None, gate: gevent.event.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.gate = gate

    def __call__(self, db: peewee.Database, keys: Sequence[str]) -> Mapping[str, AccountRow]:
        self.calls.append(list(keys))
        if self.gate is not None and len(self.calls) == 1:
            self.gate.wait(timeout=10)
        if self.fail is not None:
            raise self.fail
        return load_accounts(db, keys)


def _gets(lookup: BatchLookup[AccountRow], keys: list[str]) -> list[gevent.Greenlet]:
    return [gevent.spawn(lookup.get, key) for key in keys]


def test_concurrent_misses_are_one_query_and_each_caller_gets_its_row(db: peewee.Database) -> None:
    recorder = Recorder()
    lookup = BatchLookup(db, recorder, batching=True)
    keys = [_did(5), _did(1), _did(5), "did:plc:unknown", _did(1100), _did(1)]
    greenlets = _gets(lookup, keys)
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    results = [g.value for g in greenlets]
    assert [r.did if r else None for r in results] == [_did(5), _did(1), _did(5), None, _did(1100), _did(1)]
    assert results[4].rev == "3k001100"
    assert recorder.calls == [[_did(5), _did(1), "did:plc:unknown", _did(1100)]]  # first-asked order, once each
    assert lookup.queries == 1


def test_a_batch_holds_at_most_max_batch_keys(db: peewee.Database) -> None:
    recorder = Recorder()
    lookup = BatchLookup(db, recorder, max_batch=3, batching=True)
    greenlets = _gets(lookup, [_did(i) for i in range(7)])
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert [g.value.did for g in greenlets] == [_did(i) for i in range(7)]
    assert [len(c) for c in recorder.calls] == [3, 3, 1]


def test_misses_arriving_during_a_query_share_the_next_one_and_keys_in_flight_are_not_read_twice(
    db: peewee.Database,
) -> None:
    gate = gevent.event.Event()
    recorder = Recorder(gate=gate)
    lookup = BatchLookup(db, recorder, batching=True)
    first = _gets(lookup, [_did(1), _did(2)])
    while not recorder.calls:
        gevent.sleep(0.001)
    later = _gets(lookup, [_did(3), _did(1), _did(4)])  # _did(1) is in flight
    gevent.sleep(0.01)
    gate.set()
    gevent.joinall(first + later, timeout=10, raise_error=True)
    assert [g.value.did for g in later] == [_did(3), _did(1), _did(4)]
    assert recorder.calls == [[_did(1), _did(2)], [_did(3), _did(4)]]


def test_a_failed_query_fails_every_waiter_and_the_next_batch_reads_again(db: peewee.Database) -> None:
    recorder = Recorder(fail=peewee.OperationalError("the database system is starting up"))
    lookup = BatchLookup(db, recorder, batching=True)
    greenlets = _gets(lookup, [_did(1), _did(2), _did(1)])
    gevent.joinall(greenlets, timeout=10)
    assert all(isinstance(g.exception, peewee.OperationalError) for g in greenlets)
    recorder.fail = None
    assert lookup.get(_did(2)).did == _did(2)  # type: ignore[union-attr]
    assert len(recorder.calls) == 2


def test_without_batching_each_get_is_its_own_query(db: peewee.Database) -> None:
    recorder = Recorder()
    lookup = BatchLookup(db, recorder, batching=False)
    assert lookup.get(_did(3)).rev == "3k000003"  # type: ignore[union-attr]
    assert lookup.get("did:plc:unknown") is None
    assert recorder.calls == [[_did(3)], ["did:plc:unknown"]]


def test_store_reads_more_keys_than_one_in_clause_holds(db: peewee.Database) -> None:
    wanted = [_did(i) for i in range(0, 1200, 1)] + ["did:plc:unknown", _did(7)]
    with db.connection_context():
        rows = load_accounts(db, wanted)
    assert len(rows) == 1200 and rows[_did(1199)].rev == "3k001199"


def test_identity_rows_are_read_many_at_once(db: peewee.Database) -> None:
    saved = [IdentityRow(_did(i), f"u{i}.test", f"zKey{i}", "https://pds.test", "{}", 1.0 + i) for i in range(3)]
    save_identities(db, saved)
    got = load_identities(db, [_did(2), "did:plc:unknown", _did(0), _did(2)])
    assert got == {_did(2): saved[2], _did(0): saved[0]}


def test_account_cache_misses_share_a_query_and_a_put_during_the_read_wins(db: peewee.Database) -> None:
    cache = AccountCache(db, batching=True)
    newer = AccountState(_did(9), None, rev="3k999999")

    def put_while_reading() -> None:
        cache.put(newer)

    greenlets = [gevent.spawn(cache.get, _did(i)) for i in (8, 9, 10)]
    gevent.spawn(put_while_reading)  # runs while the batch waits to be read
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert [g.value.rev for g in greenlets] == ["3k000008", "3k999999", "3k000010"]
    assert cache._lookup.queries == 1
    assert cache.get(_did(8)).rev == "3k000008" and cache.hits == 1  # type: ignore[union-attr]


def test_mirror_heads_are_read_many_at_once(db_url: str, tmp_path: Path) -> None:
    cdb = open_database(db_url)
    store = CarStore(tmp_path / "repos", cdb)
    store.open()
    try:
        heads = [
            RepoHead(_did(i), f"3k{i:06d}", b"\x01q\x12 " + bytes([i]) * 32, b"\x01q\x12 " + bytes(32))
            for i in range(3)
        ]
        with cdb.connection_context(), cdb.atomic():
            insert_repo_heads(cdb, heads)
        got = store.heads([_did(2), "did:plc:unknown", _did(0), _did(2)])
        assert got == {_did(2): heads[2], _did(0): heads[0]}
        assert store.head(_did(1)) == heads[1]
    finally:
        store.close()
        cdb.close()


PATCHED_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import json, sys
import gevent
from actors.accounts import AccountCache, AccountState
from store.accounts import upsert_accounts
from store.db import open_database
from store.migrations import apply_migrations

db = open_database(sys.argv[1])
apply_migrations(db)
dids = [f"did:plc:{i:024d}" for i in range(300)]
with db.connection_context():
    upsert_accounts(db, [AccountState(d, None, rev="3kaaa").to_row() for d in dids])
connects = []
real_connect = db._connect
def counting_connect(*args, **kwargs):
    connects.append(1)
    return real_connect(*args, **kwargs)
db._connect = counting_connect
cache = AccountCache(db)
found = 0
for r in range(30):
    greenlets = [gevent.spawn(cache.get, d) for d in dids[r * 10 : (r + 1) * 10]]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    found += sum(g.value is not None for g in greenlets)
print(json.dumps({"found": found, "queries": cache._lookup.queries, "connects": len(connects),
                  "pool": gevent.get_hub().threadpool.maxsize}))
"""


def test_under_gevent_misses_are_batched_on_kept_open_connections(db_url: str) -> None:
    """As ``skyrelay serve`` runs: 10 concurrent misses are one query, and pool threads keep their connection."""
    proc = subprocess.run(
        [sys.executable, "-c", PATCHED_SCRIPT, db_url], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["found"] == 300 and out["queries"] == 30
    if db_url.startswith("sqlite"):  # one connection per pool thread at most, not one per batch
        assert out["connects"] <= out["pool"] < 30
