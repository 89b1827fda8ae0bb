"""The carstore (repo mirror storage): slice writes and reads, since, replace, delete, compaction, recovery.

Runs on SQLite and, with TEST_DATABASE_URL, on PostgreSQL. Repos are built with ``RepoWriter``,
so every slice is a real signed commit's blocks as a PDS would send them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest

from protocol import mst
from protocol.car import read_car
from protocol.crypto import PrivateKey
from protocol.errors import MissingBlock
from protocol.frames import CommitEvent
from protocol.repo_writer import RepoWriter, Write
from store import carstore_compact
from store.carstore import CarStore, CarStoreError, SliceWrite
from store.carstore_compact import repo_blocks
from store.carstore_schema import CARSTORE_MIGRATIONS, VERSION_TABLE
from store.db import open_database
from store.migrations import MAIN_MIGRATIONS, apply_migrations, current_version

KEY = PrivateKey.generate("k256")
NAME_RE = re.compile(r"^slices/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{32})\.[a-z2-7]{13}\.[0-9a-f]{8}\.car$")
PACK_RE = re.compile(r"^slices/packs/[0-9]{8}/[0-9]{4}/[0-9]{19}\.[0-9a-f]{8}\.pack$")


def slice_of(event: CommitEvent, data_cid: bytes) -> SliceWrite:
    car = read_car(event.blocks)
    return SliceWrite(event.repo, event.rev, event.since, event.commit, data_cid, list(car.blocks.items()))


def full_slice(writer: RepoWriter) -> SliceWrite:
    car = read_car(writer.repo_car(), max_blocks=1 << 30)
    assert writer.rev is not None and writer.commit_cid is not None
    return SliceWrite(writer.did, writer.rev, None, writer.commit_cid, writer.data, list(car.blocks.items()))


def post(i: int) -> Write:
    return Write("create", f"app.bsky.feed.post/{i:013d}", {"$type": "app.bsky.feed.post", "text": f"post {i}"})


def commits(writer: RepoWriter, n: int, start: int = 0) -> list[SliceWrite]:
    return [slice_of(writer.commit([post(i)]), writer.data) for i in range(start, start + n)]


def disk_files(store: CarStore) -> set[str]:
    root = store.directory
    return {str(p.relative_to(root)) for p in (root / "slices").rglob("*") if p.is_file()}


def live_paths(db: peewee.Database) -> set[str]:
    return {"slices/" + r[0] for r in db.execute_sql("SELECT path FROM car_slice WHERE NOT superseded").fetchall()}


def slice_ranges(db: peewee.Database) -> list[tuple[str, str, int, int]]:
    """(rev, file, offset, size) of every live slice."""
    rows = db.execute_sql("SELECT rev, path, byte_offset, byte_size FROM car_slice WHERE NOT superseded").fetchall()
    return [(str(r), "slices/" + str(p), int(o), int(n)) for r, p, o, n in rows]


def disk_bytes(store: CarStore) -> int:
    return sum((store.directory / f).stat().st_size for f in disk_files(store))


def records(blocks: dict[bytes, bytes], data_cid: bytes) -> dict[str, bytes]:
    return dict(mst.walk(blocks, data_cid))


@pytest.fixture
def db(db_url: str) -> Iterator[peewee.Database]:
    database = open_database(db_url)
    yield database
    close_all = getattr(database, "close_all", None)
    close_all() if close_all is not None else database.close()


@pytest.fixture
def store(db: peewee.Database, tmp_path: Path) -> Iterator[CarStore]:
    s = CarStore(tmp_path / "carstore", db)
    s.open()
    yield s
    s.close()


@pytest.fixture(scope="module")
def history() -> tuple[RepoWriter, list[SliceWrite]]:
    """1,000 commits to one account: creates, updates and deletes (so blocks become unreachable)."""
    writer = RepoWriter("did:plc:history", KEY)
    rng = random.Random(4)
    live: list[str] = []
    out = []
    for i in range(1000):
        roll = rng.random()
        if live and roll < 0.25:
            w = Write("update", rng.choice(live), {"$type": "app.bsky.feed.post", "text": f"edit {i}"})
        elif live and roll < 0.4:
            w = Write("delete", live.pop(rng.randrange(len(live))))
        else:
            w = post(i)
            live.append(w.path)
        out.append(slice_of(writer.commit([w]), writer.data))
    return writer, out


def test_round_trip_of_slices_from_two_accounts(store: CarStore, db: peewee.Database) -> None:
    alice, bob = RepoWriter("did:plc:alice", KEY), RepoWriter("did:plc:bob", KEY)
    a, b = commits(alice, 3), commits(bob, 2)
    store.write_slices([a[0], b[0], a[1]])
    store.write_slices([b[1], a[2]])
    head = store.head(alice.did)
    assert head is not None and (head.rev, head.commit_cid, head.data_cid) == (alice.rev, alice.commit_cid, alice.data)
    assert store.head("did:plc:nobody") is None
    for writer, slices in ((alice, a), (bob, b)):
        union = {cid: blk for s in slices for cid, blk in s.blocks}
        assert store.load_blocks(writer.did) == union
        assert records(union, writer.data) == writer.records
        some = [slices[0].commit_cid, slices[-1].data_cid, b"\x01q\x12 " + bytes(32)]
        assert store.get_blocks(writer.did, some) == {cid: union[cid] for cid in some[:2]}
    assert store.load_blocks("did:plc:nobody") == {} and store.repo_car("did:plc:nobody") is None
    files = disk_files(store)
    size = sum((store.directory / f).stat().st_size for f in files)
    assert store.stats() == {"files": 2, "slices": 5, "bytes": size, "superseded_files": 0, "accounts": 2}
    assert len(files) == 2 and all(PACK_RE.match(f) for f in files)  # one pack file per batch
    # a pack is its slices' CARs back to back; each byte range is a CAR rooted at its commit
    ranges = slice_ranges(db)
    by_rev = {s.rev: s for s in a + b}
    for path in files:
        mine = sorted((off, n, rev) for rev, p, off, n in ranges if p == path)
        assert [off for off, _, _ in mine] == [0] + [off + n for off, n, _ in mine[:-1]]
        data = (store.directory / path).read_bytes()
        assert len(data) == sum(n for _, n, _ in mine)
        for off, n, rev in mine:
            car = read_car(data[off : off + n])
            assert car.roots == (by_rev[rev].commit_cid,) and car.blocks == dict(by_rev[rev].blocks)


def test_load_blocks_of_many_slices_is_their_union_and_the_repo_walks(store: CarStore) -> None:
    writer = RepoWriter("did:plc:many", KEY)
    slices = commits(writer, 120)
    for i in range(0, 120, 25):
        store.write_slices(slices[i : i + 25])
    blocks = store.load_blocks(writer.did)
    assert blocks == {cid: blk for s in slices for cid, blk in s.blocks}
    assert records(blocks, writer.data) == writer.records
    car = store.repo_car(writer.did)
    assert car is not None
    parsed = read_car(car, max_blocks=1 << 20)
    assert parsed.roots == (writer.commit_cid,)
    assert records(parsed.blocks, writer.data) == writer.records
    assert set(parsed.blocks) == set(read_car(writer.repo_car(), max_blocks=1 << 20).blocks)
    assert store.accounts_needing_compaction(120) == [writer.did]
    assert store.accounts_needing_compaction(121) == []


def test_since_returns_only_later_slices(store: CarStore) -> None:
    writer = RepoWriter("did:plc:since", KEY)
    slices = commits(writer, 10)
    store.write_slices(slices)
    since = slices[5].rev
    later = {cid: blk for s in slices[6:] for cid, blk in s.blocks}
    assert store.load_blocks(writer.did, since=since) == later
    assert store.load_blocks(writer.did, since=slices[-1].rev) == {}
    car = read_car(store.repo_car(writer.did, since=since) or b"")
    assert car.roots == (writer.commit_cid,) and car.blocks == later
    # applying the diff to a copy taken at `since` yields the new tree
    old = {cid: blk for s in slices[:6] for cid, blk in s.blocks}
    assert records({**old, **later}, writer.data) == writer.records


def test_replace_repo_makes_the_new_repo_the_only_live_data(store: CarStore, db: peewee.Database) -> None:
    writer = RepoWriter("did:plc:replace", KEY)
    store.write_slices(commits(writer, 20))
    other = RepoWriter("did:plc:other", KEY)
    store.write_slices(commits(other, 2))
    fresh = RepoWriter(writer.did, KEY)  # the account's PDS rebuilt its repo: a different history
    fresh.commit([post(i) for i in range(100, 130)])
    full = full_slice(fresh)
    store.replace_repo(full)
    assert store.load_blocks(writer.did) == dict(full.blocks)
    head = store.head(writer.did)
    assert head is not None and head.commit_cid == fresh.commit_cid and head.rev == fresh.rev
    assert disk_files(store) == live_paths(db)  # the replaced account's pack went with its last slice
    assert (store.stats()["files"], store.stats()["slices"]) == (2, 3)
    assert store.accounts_needing_compaction(2) == [other.did]
    assert store.repo_car(writer.did) == store.repo_car(writer.did)
    assert records(read_car(store.repo_car(writer.did) or b"").blocks, fresh.data) == fresh.records
    # later commits stack on top of the replaced repo
    store.write_slices(commits(fresh, 2, start=500))
    assert records(store.load_blocks(writer.did), fresh.data) == fresh.records


def test_delete_repo_removes_rows_and_files(store: CarStore, db: peewee.Database) -> None:
    gone, kept = RepoWriter("did:plc:gone", KEY), RepoWriter("did:plc:kept", KEY)
    store.write_slices(commits(gone, 5) + commits(kept, 3))
    store.delete_repo(gone.did)
    assert store.head(gone.did) is None and store.load_blocks(gone.did) == {}
    assert store.repo_car(gone.did) is None
    assert records(store.load_blocks(kept.did), kept.data) == kept.records
    assert disk_files(store) == live_paths(db) and len(disk_files(store)) == 1  # the pack holds kept's slices
    assert store.stats()["accounts"] == 1 and store.stats()["slices"] == 3
    store.delete_repo(kept.did)  # the pack's last live slices: now the file goes
    assert disk_files(store) == set() and store.stats()["superseded_files"] == 0
    store.delete_repo("did:plc:never-seen")  # no-op


def test_compaction_keeps_exactly_the_reachable_blocks(
    store: CarStore, history: tuple[RepoWriter, list[SliceWrite]]
) -> None:
    writer, slices = history
    for i in range(0, len(slices), 100):
        store.write_slices(slices[i : i + 100])
    did = writer.did
    before_blocks = store.load_blocks(did)
    reachable = repo_blocks(before_blocks, writer.commit_cid or b"")
    before_car = store.repo_car(did)
    files_before, stats_before = disk_files(store), store.stats()
    disk_before = sum((store.directory / f).stat().st_size for f in files_before)
    assert len(files_before) == 10 and len(reachable) < len(before_blocks)  # updates and deletes left garbage

    stats = store.compact(did)
    assert stats.compacted and (stats.slices_before, stats.slices_after) == (1000, 1)
    assert stats.blocks_after == len(reachable) and stats.bytes_after < stats.bytes_before
    files_after = disk_files(store)
    assert len(files_after) == 1 and not files_after & files_before
    assert sum((store.directory / f).stat().st_size for f in files_after) < disk_before
    assert store.stats()["bytes"] < stats_before["bytes"]
    after_blocks = store.load_blocks(did)
    assert after_blocks == reachable  # every reachable block, byte for byte, and nothing else
    assert records(after_blocks, writer.data) == records(before_blocks, writer.data) == writer.records
    assert store.repo_car(did) == before_car  # getRepo output is byte-identical
    assert (store.directory / next(iter(files_after))).read_bytes() == before_car
    head = store.head(did)
    assert head is not None and head.commit_cid == writer.commit_cid
    assert store.compact(did).outcome == "already_compact"
    assert store.accounts_needing_compaction(2) == []


def test_compaction_keeps_a_slice_written_while_it_ran(store: CarStore, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = RepoWriter("did:plc:concurrent", KEY)
    store.write_slices(commits(writer, 30))
    late = commits(writer, 2, start=30)
    real = carstore_compact.repo_blocks

    def write_meanwhile(blocks: dict[bytes, bytes], commit: bytes) -> dict[bytes, bytes]:
        store.write_slices(late)  # ingest goes on between compaction's read and its swap
        return real(blocks, commit)

    monkeypatch.setattr(carstore_compact, "repo_blocks", write_meanwhile)
    stats = store.compact(writer.did)
    assert stats.compacted and stats.slices_before == 30
    assert store.stats()["slices"] == 3  # the compacted slice and the two written meanwhile
    assert store.stats()["files"] == 2  # the compacted file and the pack written meanwhile
    head = store.head(writer.did)
    assert head is not None and head.rev == late[-1].rev
    assert records(store.load_blocks(writer.did), writer.data) == writer.records
    assert store.load_blocks(writer.did, since=late[0].since) == {c: b for s in late for c, b in s.blocks}
    monkeypatch.setattr(carstore_compact, "repo_blocks", real)
    assert store.compact(writer.did).slices_before == 3
    assert records(store.load_blocks(writer.did), writer.data) == writer.records


@pytest.mark.parametrize("rival", ["replace", "delete"])
def test_compaction_losing_a_race_changes_nothing(
    store: CarStore, db: peewee.Database, monkeypatch: pytest.MonkeyPatch, rival: str
) -> None:
    writer = RepoWriter("did:plc:race", KEY)
    store.write_slices(commits(writer, 10))
    fresh = RepoWriter(writer.did, KEY)
    fresh.commit([post(77)])
    real = carstore_compact.repo_blocks

    def rival_meanwhile(blocks: dict[bytes, bytes], commit: bytes) -> dict[bytes, bytes]:
        store.replace_repo(full_slice(fresh)) if rival == "replace" else store.delete_repo(writer.did)
        return real(blocks, commit)

    monkeypatch.setattr(carstore_compact, "repo_blocks", rival_meanwhile)
    assert store.compact(writer.did).outcome == "conflict"
    assert disk_files(store) == live_paths(db)  # the compacted file was discarded
    if rival == "replace":
        assert store.load_blocks(writer.did) == dict(full_slice(fresh).blocks)
        assert store.accounts_needing_compaction(1) == [writer.did]
    else:
        assert store.head(writer.did) is None and store.stats()["files"] == 0


def test_compaction_of_an_incomplete_mirror_fails_and_changes_nothing(store: CarStore) -> None:
    writer = RepoWriter("did:plc:holes", KEY)
    slices = commits(writer, 5)
    store.write_slices(slices[2:])  # the first commits (and the records they made) never arrived
    files = disk_files(store)
    with pytest.raises(MissingBlock):
        store.compact(writer.did)
    with pytest.raises(MissingBlock):
        store.repo_car(writer.did)
    assert disk_files(store) == files and store.stats()["slices"] == 3


def test_open_removes_orphans_and_superseded_files(db: peewee.Database, tmp_path: Path) -> None:
    writer = RepoWriter("did:plc:crash", KEY)
    slices = commits(writer, 4)
    store = CarStore(tmp_path / "cs", db)
    store.open()
    store.write_slices(slices[:1])
    store.write_slices(slices[1:2])
    acked = disk_files(store)
    # a crash after the files were written and synced, before their metadata transaction
    rel = store._new_pack_path()
    store._stage(writer.did, rel, b"partial or complete, never recorded")
    rel2 = store._new_path(writer.did, slices[2].rev)
    store._stage(writer.did, rel2, b"a replace or compaction, never recorded")
    # a crash after a compaction's swap committed, before the old files were removed
    db.execute_sql("UPDATE car_slice SET superseded = TRUE WHERE rev = " + db.param, (slices[0].rev,))
    superseded = {"slices/" + str(p) for (p,) in db.execute_sql("SELECT path FROM car_slice WHERE superseded")}
    assert len(superseded) == 1 and superseded < acked
    store.close()
    assert disk_files(store) == acked | {"slices/" + rel, "slices/" + rel2}

    store = CarStore(tmp_path / "cs", db)
    store.open()
    assert disk_files(store) == acked - superseded
    assert db.execute_sql("SELECT COUNT(*) FROM car_pending").fetchone()[0] == 0
    assert db.execute_sql("SELECT COUNT(*) FROM car_slice").fetchone()[0] == 1
    store.write_slices(slices[2:])
    head = store.head(writer.did)
    assert head is not None and head.rev == writer.rev
    store.close()


def test_one_store_per_directory(db: peewee.Database, tmp_path: Path) -> None:
    first = CarStore(tmp_path / "cs", db)
    first.open()
    with pytest.raises(CarStoreError, match="in use"):
        CarStore(tmp_path / "cs", db).open()
    first.close()
    with pytest.raises(CarStoreError, match="not open"):
        first.load_blocks("did:plc:x")


def test_the_main_database_may_hold_the_carstore_too(db_url: str, tmp_path: Path) -> None:
    """One database for both, as the seed allows: each schema records its versions in its own table."""
    db = open_database(db_url)
    assert apply_migrations(db) == MAIN_MIGRATIONS[-1].version
    store = CarStore(tmp_path / "cs", db)
    store.open()
    writer = RepoWriter("did:plc:shared", KEY)
    store.write_slices(commits(writer, 3))
    store.close()
    assert apply_migrations(db) == MAIN_MIGRATIONS[-1].version  # both again, in either order
    store = CarStore(tmp_path / "cs", db)
    store.open()
    assert records(store.load_blocks(writer.did), writer.data) == writer.records
    store.close()
    with db.connection_context():
        assert current_version(db) == MAIN_MIGRATIONS[-1].version
        assert current_version(db, VERSION_TABLE) == CARSTORE_MIGRATIONS[-1].version
    db.close()


def test_a_carstore_database_from_before_the_split_keeps_its_history(db_url: str, tmp_path: Path) -> None:
    """Its versions were in ``schema_version``: they move to the carstore's own table, nothing re-runs."""
    db = open_database(db_url)
    apply_migrations(db, CARSTORE_MIGRATIONS[:1])  # as released: carstore versions in schema_version
    apply_migrations(db, CARSTORE_MIGRATIONS)
    store = CarStore(tmp_path / "cs", db)
    store.open()  # a re-run of migration 1 would fail: its tables exist
    store.close()
    with db.connection_context():
        assert current_version(db, VERSION_TABLE) == CARSTORE_MIGRATIONS[-1].version
        assert current_version(db) == 0
    assert apply_migrations(db) == MAIN_MIGRATIONS[-1].version  # and the relay's schema fits beside it
    db.close()


@pytest.mark.parametrize("method", ["fsync", "auto"])
def test_durable_write_methods(db: peewee.Database, tmp_path: Path, method: str) -> None:
    store = CarStore(tmp_path / "cs", db, sync_method=method)
    store.open()
    writers = [RepoWriter(f"did:plc:m{i}", KEY) for i in range(20)]
    store.write_slices([s for w in writers for s in commits(w, 2)])
    for w in writers:
        assert records(store.load_blocks(w.did), w.data) == w.records
    store.close()
    with pytest.raises(ValueError, match="sync_method"):
        CarStore(tmp_path / "cs", db, sync_method="sometimes")


def test_a_pack_goes_with_its_last_live_slice_and_compaction_shrinks_what_an_account_spans(
    store: CarStore, db: peewee.Database
) -> None:
    alice, bob = RepoWriter("did:plc:pack-alice", KEY), RepoWriter("did:plc:pack-bob", KEY)
    a, b = commits(alice, 40), commits(bob, 40)
    for i in range(0, 40, 10):  # four packs, each holding both accounts' slices
        store.write_slices([s for pair in zip(a[i : i + 10], b[i : i + 10], strict=True) for s in pair])
    packs, disk_before = disk_files(store), disk_bytes(store)
    assert len(packs) == 4 and all(PACK_RE.match(f) for f in packs)

    assert store.compact(alice.did).compacted
    alice_files = {p for rev, p, _, _ in slice_ranges(db) if rev in {s.rev for s in a}}
    assert len(alice_files) == 1 and not alice_files & packs  # alice's live data is one file now
    assert disk_files(store) == packs | alice_files == live_paths(db)  # the packs stay: bob's slices are live
    assert records(store.load_blocks(bob.did), bob.data) == bob.records
    assert records(store.load_blocks(alice.did), alice.data) == alice.records
    assert store.stats()["superseded_files"] == 0

    assert store.compact(bob.did).compacted  # the packs' last live slices: now they go
    files = disk_files(store)
    assert len(files) == 2 and not files & packs and files == live_paths(db)
    assert disk_bytes(store) < disk_before and store.stats()["bytes"] == disk_bytes(store)
    assert records(store.load_blocks(bob.did), bob.data) == bob.records


def test_open_purges_superseded_slices_and_removes_only_packs_without_live_ones(
    db: peewee.Database, tmp_path: Path
) -> None:
    alice, bob = RepoWriter("did:plc:open-alice", KEY), RepoWriter("did:plc:open-bob", KEY)
    a, b = commits(alice, 2), commits(bob, 2)
    store = CarStore(tmp_path / "cs", db)
    store.open()
    store.write_slices([a[0], b[0]])  # shared pack
    store.write_slices([a[1]])  # alice only
    shared = {p for rev, p, _, _ in slice_ranges(db) if rev == b[0].rev}
    only_alice = {p for rev, p, _, _ in slice_ranges(db) if rev == a[1].rev}
    # a crash after alice's slices were superseded (a replace committed), before any file went
    db.execute_sql("UPDATE car_slice SET superseded = TRUE WHERE did = " + db.param, (alice.did,))
    store.close()

    store = CarStore(tmp_path / "cs", db)
    store.open()
    assert disk_files(store) == shared == live_paths(db)  # alice's own pack went, the shared one stays for bob
    assert not only_alice & disk_files(store)
    assert store.stats()["superseded_files"] == 0 and store.stats()["slices"] == 1
    assert store.load_blocks(bob.did) == dict(b[0].blocks)
    store.write_slices([b[1]])
    db.execute_sql("UPDATE car_slice SET superseded = TRUE WHERE rev = " + db.param, (b[0].rev,))
    store.close()

    store = CarStore(tmp_path / "cs", db)
    store.open()
    assert disk_files(store) == live_paths(db) and not shared & disk_files(store)
    assert store.load_blocks(bob.did) == dict(b[1].blocks)
    store.close()
