"""Identity resolution over real HTTP to a fake PLC on loopback, persisted in SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peewee
import pytest
from prometheus_client import REGISTRY

from actors.identity import IdentityDirectory, IdentityResolver
from actors.messages_identity import FlushIdentities, RefreshIdentity
from protocol.crypto import K256, PrivateKey
from protocol.diddoc import Identity
from protocol.identity_errors import IdentityNotFound, IdentityUnavailable, UnsupportedDid
from store.db import open_database
from store.identities import IdentityRow, delete_identities, load_identity, save_identities
from store.migrations import apply_migrations
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.testdata import REFPDS_DID_DOCS, refpds_endpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
PDS = "https://pds.example.com"


class FakeClock:
    """Wall-clock stand-in the tests move forward instead of sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def resolved(result: str) -> float:
    return metric("skyrelay_identity_resolve_total", result=result)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def new_key() -> str:
    return PrivateKey.generate(K256).public_key().did_key()


def register(plc: FakePlc, *, handle: str | None = "alice.example.com") -> tuple[str, str]:
    did, key = new_plc_did(), new_key()
    plc.put(did, make_did_doc(did, key, PDS, handle=handle))
    return did, key


@pytest.fixture
def db(db_url: str) -> Iterator[peewee.Database]:
    database = open_database(db_url)
    apply_migrations(database)
    yield database
    close_all = getattr(database, "close_all", None)
    if close_all is not None:
        close_all()
    else:
        database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_directory(db: peewee.Database | None, plc: FakePlc, clock: FakeClock, **kwargs: object) -> IdentityDirectory:
    options: dict[str, object] = {"ttl_seconds": 3600.0, "fetch_timeout_seconds": 2.0, "clock": clock}
    options.update(kwargs)
    return IdentityDirectory(db, plc_url=plc.url, **options)  # type: ignore[arg-type]


def test_cache_hit_avoids_the_network(db: peewee.Database, plc: FakePlc, clock: FakeClock) -> None:
    did, key = register(plc)
    directory = make_directory(db, plc, clock)
    hits, fetched = resolved("hit"), resolved("fetched")
    first = directory.resolve(did)
    assert first == Identity(did, "alice.example.com", key, PDS)  # type: ignore[arg-type]
    for _ in range(5):
        assert directory.resolve(did) is first
    assert plc.requests_for(did) == 1
    assert resolved("fetched") - fetched == 1 and resolved("hit") - hits == 5


def test_identities_survive_a_new_directory_through_sql(db: peewee.Database, plc: FakePlc, clock: FakeClock) -> None:
    did, key = register(plc)
    first = make_directory(db, plc, clock)
    identity = first.resolve(did)
    assert first.pending_writes == 1
    assert first.flush() == 1 and first.pending_writes == 0
    row = load_identity(db, did)
    assert row is not None and row.signing_key == key and json.loads(row.doc)["id"] == did

    plc.fail("close")  # a restarted relay must not need the PLC for known DIDs
    from_sql = resolved("sql")
    second = make_directory(db, plc, clock)
    assert second.resolve(did) == identity
    assert second.resolve(did) == identity  # now from memory
    assert resolved("sql") - from_sql == 1
    assert plc.requests_for(did) == 1


def test_store_upserts_in_batches_and_keeps_the_newest(db: peewee.Database) -> None:
    rows = [IdentityRow(new_plc_did(), None, new_key(), PDS, "{}", 100.0) for _ in range(400)]
    assert save_identities(db, rows) == 400
    changed = IdentityRow(rows[0].did, "new.example.com", None, None, '{"x":1}', 200.0)
    older = IdentityRow(rows[1].did, "old.example.com", None, None, "{}", 50.0)
    assert save_identities(db, [changed, older]) == 2
    assert load_identity(db, rows[0].did) == changed
    assert load_identity(db, rows[1].did) == rows[1]  # an older fetch never overwrites a newer one
    assert delete_identities(db, [rows[0].did, rows[0].did, "did:plc:absent"]) == 2
    assert load_identity(db, rows[0].did) is None
    assert load_identity(db, rows[2].did) == rows[2]


def test_stale_entry_is_served_while_the_plc_is_down(db: peewee.Database, plc: FakePlc, clock: FakeClock) -> None:
    did, key = register(plc)
    directory = make_directory(db, plc, clock, ttl_seconds=60.0, failure_retry_seconds=30.0)
    identity = directory.resolve(did)

    plc.fail("error")
    clock.advance(61)
    stale, unavailable = resolved("stale"), metric("skyrelay_identity_fetch_total", result="unavailable")
    assert directory.resolve(did) == identity  # served at once; a background re-fetch starts
    wait_until(lambda: metric("skyrelay_identity_fetch_total", result="unavailable") - unavailable == 1)
    for _ in range(5):
        assert directory.resolve(did) == identity
    assert resolved("stale") - stale == 6
    assert plc.requests_for(did) == 2  # the failed re-fetch is not retried within failure_retry_seconds

    rotated = new_key()
    plc.put(did, make_did_doc(did, rotated, PDS, handle="alice.example.com"))
    plc.recover()
    clock.advance(31)
    assert directory.resolve(did).signing_key == key  # still stale; the retry runs in the background
    wait_until(lambda: (found := directory.peek(did)) is not None and found.signing_key == rotated)
    assert plc.requests_for(did) == 3


def test_unknown_did_with_the_plc_down_is_unavailable_and_fails_fast(plc: FakePlc, clock: FakeClock) -> None:
    did, _ = register(plc)
    directory = make_directory(None, plc, clock, failure_retry_seconds=30.0)
    plc.fail("close")
    for _ in range(3):
        with pytest.raises(IdentityUnavailable) as err:
            directory.resolve(did)
        assert err.value.reason == "identity_unavailable"
    assert plc.requests_for(did) == 1  # failures are remembered for failure_retry_seconds
    plc.recover()
    clock.advance(31)
    assert directory.resolve(did).did == did


def test_refresh_is_rate_limited_per_did(db: peewee.Database, plc: FakePlc, clock: FakeClock) -> None:
    did, key = register(plc)
    directory = make_directory(db, plc, clock, refresh_min_interval_seconds=10.0)
    directory.resolve(did)
    rotated = new_key()
    plc.put(did, make_did_doc(did, rotated, PDS))
    limited = metric("skyrelay_identity_refresh_limited_total")
    for _ in range(50):  # a forger's stream of bad signatures
        assert directory.refresh(did).signing_key == key
    assert plc.requests_for(did) == 1
    assert metric("skyrelay_identity_refresh_limited_total") - limited == 50

    clock.advance(10.5)
    refreshed = directory.refresh(did)
    assert refreshed.signing_key == rotated and refreshed.handle is None
    assert directory.refresh(did) == refreshed
    assert plc.requests_for(did) == 2


def test_refresh_serves_stale_when_down_and_evicts_when_gone(
    db: peewee.Database, plc: FakePlc, clock: FakeClock
) -> None:
    did, _ = register(plc)
    directory = make_directory(db, plc, clock, refresh_min_interval_seconds=10.0)
    identity = directory.resolve(did)
    directory.flush()

    plc.fail("error")
    clock.advance(11)
    assert directory.refresh(did) == identity

    plc.recover()
    plc.tombstone(did)
    clock.advance(11)
    with pytest.raises(IdentityNotFound) as err:
        directory.refresh(did)
    assert err.value.reason == "identity_not_found"
    assert directory.peek(did) is None
    with pytest.raises(IdentityNotFound):
        directory.resolve(did)  # remembered, not fetched again
    assert plc.requests_for(did) == 3
    directory.flush()
    assert load_identity(db, did) is None


def test_refresh_after_a_restart_with_the_plc_down_uses_the_table(
    db: peewee.Database, plc: FakePlc, clock: FakeClock
) -> None:
    did, _ = register(plc)
    before = make_directory(db, plc, clock)
    identity = before.resolve(did)
    before.flush()
    plc.fail("error")
    after = make_directory(db, plc, clock)
    assert after.refresh(did) == identity  # the #identity event of a known account, PLC down
    assert after.resolve(did) == identity  # and the failed fetch does not poison later look-ups
    assert plc.requests_for(did) == 2


def test_invalidate_forgets_memory_and_table(db: peewee.Database, plc: FakePlc, clock: FakeClock) -> None:
    did, _ = register(plc)
    directory = make_directory(db, plc, clock)
    directory.resolve(did)
    directory.flush()
    directory.invalidate(did)
    assert directory.peek(did) is None
    directory.flush()
    assert load_identity(db, did) is None
    directory.resolve(did)
    assert plc.requests_for(did) == 2


def test_lru_is_bounded_and_evicted_entries_come_back_without_fetching(
    db: peewee.Database, plc: FakePlc, clock: FakeClock
) -> None:
    dids = [register(plc)[0] for _ in range(3)]
    directory = make_directory(db, plc, clock, max_entries=2)
    for did in dids:
        directory.resolve(did)
    assert len(directory) == 2 and directory.peek(dids[0]) is None
    from_sql = resolved("sql")
    assert directory.resolve(dids[0]).did == dids[0]  # from the write-behind queue, before any flush
    directory.flush()
    assert directory.resolve(dids[1]).did == dids[1]  # evicted by the line above: from the table
    assert resolved("sql") - from_sql == 2
    assert all(plc.requests_for(did) == 1 for did in dids)


def test_concurrent_resolves_share_one_fetch(db: peewee.Database, plc: FakePlc, clock: FakeClock) -> None:
    did, key = register(plc)
    directory = make_directory(db, plc, clock)
    shared = metric("skyrelay_identity_fetch_shared_total")
    results: list[Identity] = []
    plc.hold()
    threads = [threading.Thread(target=lambda: results.append(directory.resolve(did))) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: metric("skyrelay_identity_fetch_shared_total") - shared == 7)
        wait_until(lambda: plc.requests_for(did) >= 1)  # the leader's request may still be on its way
    finally:
        plc.release()
    for thread in threads:
        thread.join(timeout=10)
    assert len(results) == 8 and {r.signing_key for r in results} == {key}
    assert plc.requests_for(did) == 1


GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
from prometheus_client import REGISTRY
from actors.identity import IdentityDirectory
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did

did = new_plc_did()
with FakePlc({did: make_did_doc(did, sys.argv[1], "https://pds.example.com")}) as plc:
    directory = IdentityDirectory(None, plc_url=plc.url, fetch_timeout_seconds=5)
    plc.hold()
    greenlets = [gevent.spawn(directory.resolve, did) for _ in range(20)]
    deadline = time.monotonic() + 10
    while (REGISTRY.get_sample_value("skyrelay_identity_fetch_shared_total") or 0) < 19:
        if time.monotonic() > deadline:
            sys.exit("followers did not join the in-flight fetch")
        gevent.sleep(0.01)
    plc.release()
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    again = gevent.spawn(directory.resolve, did).get(timeout=10)
    print(json.dumps({"requests": plc.requests_for(did), "keys": sorted({g.value.signing_key for g in greenlets}),
                      "again": again.signing_key}))
"""


def test_concurrent_resolves_share_one_fetch_under_gevent() -> None:
    key = new_key()
    proc = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, key], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"requests": 1, "keys": [key], "again": key}


def test_did_web_against_a_local_host_in_insecure_mode(plc: FakePlc, clock: FakeClock) -> None:
    did, key = f"did:web:localhost%3A{plc.port}", new_key()
    plc.put(did, make_did_doc(did, key, "http://localhost:2583/", handle="web.example.com"))
    insecure = make_directory(None, plc, clock, allow_insecure_hosts=True)
    assert insecure.resolve(did) == Identity(did, "web.example.com", key, "http://localhost:2583")  # type: ignore[arg-type]
    assert plc.requests_for(did) == 1

    secure = make_directory(None, plc, clock)
    with pytest.raises(UnsupportedDid):
        secure.resolve(did)
    assert plc.requests_for(did) == 1


def test_document_for_another_did_is_refused(plc: FakePlc, clock: FakeClock) -> None:
    did, other = new_plc_did(), new_plc_did()
    plc.put(did, make_did_doc(other, new_key(), PDS))
    with pytest.raises(Exception) as err:
        make_directory(None, plc, clock).resolve(did)
    assert getattr(err.value, "reason", None) == "did_doc_mismatch"


def test_oversized_and_slow_documents_are_unavailable(plc: FakePlc, clock: FakeClock) -> None:
    big, _ = register(plc)
    doc = make_did_doc(big, new_key(), PDS)
    doc["padding"] = "x" * 10_000
    plc.put(big, doc)
    with pytest.raises(IdentityUnavailable, match="larger than"):
        make_directory(None, plc, clock, max_doc_bytes=4096).resolve(big)

    slow, _ = register(plc)
    plc.delay_seconds = 1.0
    started = time.monotonic()
    with pytest.raises(IdentityUnavailable):
        make_directory(None, plc, clock, fetch_timeout_seconds=0.2).resolve(slow)
    assert time.monotonic() - started < 0.9


def test_resolver_actor_refreshes_and_flushes(db: peewee.Database, plc: FakePlc, clock: FakeClock) -> None:
    did, key = register(plc)
    directory = make_directory(db, plc, clock)
    actor = IdentityResolver.start(directory, flush_interval_seconds=0.05)
    try:
        actor.tell(RefreshIdentity(did))
        wait_until(lambda: load_identity(db, did) is not None)  # fetched, then flushed by the ticker
        row = load_identity(db, did)
        assert row is not None and row.signing_key == key

        plc.fail("close")
        down = new_plc_did()
        actor.tell(RefreshIdentity(down))
        wait_until(lambda: plc.requests_for(down) >= 1)  # twice: a kept connection closed unanswered is retried
        assert actor.ask(FlushIdentities(), timeout=5) is None
        assert actor.is_alive()
    finally:
        actor.stop(timeout=10)


def test_fake_plc_as_a_process_serves_real_plc_documents(clock: FakeClock) -> None:
    docs_path = REFPDS_DID_DOCS
    docs = json.loads(docs_path.read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_plc", "--port", "0", "--docs", str(docs_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(" listening on ")[1].split()[0]
        directory = IdentityDirectory(
            None, plc_url=url, fetch_timeout_seconds=5.0, clock=clock, allow_insecure_hosts=True
        )  # the reference PDS of these documents serves http
        for did in docs:
            identity = directory.resolve(did)
            assert identity.signing_key is not None and identity.pds_endpoint == refpds_endpoint()
        with pytest.raises(IdentityNotFound):
            directory.resolve(new_plc_did())
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
