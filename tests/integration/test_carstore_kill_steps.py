"""The carstore after a SIGKILL at a chosen step of a write, replace or compaction: it opens, reads, writes again.

``test_carstore_crash`` kills at random moments; this kills a child at one named step of one
operation, so each crash window is tried every time:

- ``directory``: the write intent is committed, the file's directory does not exist yet (the
  first pack of a UTC minute, the first replace or compaction of an account's shard);
- ``record``: the file is written and synced, its metadata transaction has not committed;
- ``purge``: the supersede committed, the old files and rows are not yet removed.

Reopening must finish what the kill interrupted (no intent, no orphan file, no superseded row
left), every account must read back whole at (at least) its acknowledged rev, and the store must
take writes again in the directories the kill left half made.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import peewee
import pytest

from protocol import mst
from protocol.car import read_car
from protocol.crypto import PrivateKey
from protocol.repo_writer import RepoWriter, Write
from store import carstore_schema
from store.carstore import CarStore, SliceWrite
from store.carstore_compact import repo_blocks
from store.db import open_database

REPO_ROOT = Path(__file__).resolve().parents[2]
DID = "did:plc:killstep"
WAIT_S = 60

CHILD = """
import os, signal, sys
from pathlib import Path
from protocol.car import read_car
from protocol.crypto import PrivateKey
from protocol.repo_writer import RepoWriter, Write
from store import carstore_schema
from store.carstore import CarStore, SliceWrite
from store.db import open_database

url, directory, op, step = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
store = CarStore(directory, open_database(url))
store.open()
w = RepoWriter("did:plc:killstep", PrivateKey.generate("k256"))

def post(i):
    return Write("create", f"app.bsky.feed.post/{i:013d}", {"text": f"post {i}"})

def commit(i):
    event = w.commit([post(i)])
    return SliceWrite(w.did, event.rev, event.since, event.commit, w.data, list(read_car(event.blocks).blocks.items()))

def whole():
    blocks = list(read_car(w.repo_car(), max_blocks=1 << 30).blocks.items())
    return SliceWrite(w.did, w.rev, None, w.commit_cid, w.data, blocks)

# the acknowledged state: a write op's pack directory, or a replace or compaction's shard, is new
if op == "write":
    for i in range(3):
        w.commit([post(i)])
    store.replace_repo(whole())
else:
    for i in range(3):
        store.write_slices([commit(i)])
print("acked", w.rev, flush=True)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if step == "directory":
    CarStore._ensure_dir = die
elif step == "record":
    carstore_schema.insert_slices = die
else:
    CarStore._remove = die
if op == "write":
    store.write_slices([commit(3)])
elif op == "replace":
    w.commit([post(3)])
    store.replace_repo(whole())
else:
    store.compact(w.did)
print("not killed", flush=True)
"""

CASES = [
    ("write", "directory"),
    ("write", "record"),
    ("replace", "directory"),
    ("replace", "record"),
    ("replace", "purge"),
    ("compact", "directory"),
    ("compact", "record"),
    ("compact", "purge"),
]


def check_complete(store: CarStore, acked_rev: str) -> RepoWriter:
    """Assert the account reads back whole at or past ``acked_rev``, nothing left over; a writer on its head."""
    head = store.head(DID)
    assert head is not None and head.rev >= acked_rev
    blocks = store.load_blocks(DID)
    repo_blocks(blocks, head.commit_cid)  # commit, every node, every record: no MissingBlock
    db = store._db
    rows = db.execute_sql("SELECT path, superseded FROM car_slice").fetchall()
    assert not any(superseded for _, superseded in rows), "superseded rows left"
    slices = store.directory / "slices"
    on_disk = {str(p.relative_to(slices)) for p in slices.rglob("*") if p.is_file()}
    assert on_disk == {str(path) for path, _ in rows}, "files and rows disagree"
    assert db.execute_sql("SELECT COUNT(*) FROM car_pending").fetchone()[0] == 0
    writer = RepoWriter(DID, PrivateKey.generate("k256"))  # the store checks no signature
    writer.blocks, writer.data, writer.rev, writer.commit_cid = blocks, head.data_cid, head.rev, head.commit_cid
    writer.records = dict(mst.walk(blocks, head.data_cid))
    return writer


@pytest.mark.parametrize(("op", "step"), CASES)
def test_open_after_a_kill_at_each_step_recovers_and_takes_writes_again(
    tmp_path: Path, db_url: str, op: str, step: str
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    directory = tmp_path / "carstore"
    proc = subprocess.run(
        [sys.executable, str(script), db_url, str(directory), op, step],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
    )
    out = proc.stdout.decode().split("\n")
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, proc.stderr.decode()[-2000:])
    assert out[0].startswith("acked ") and "not killed" not in out
    acked_rev = out[0].split()[1]

    db = open_database(db_url)
    try:
        store = CarStore(directory, db)
        store.open()
        writer = check_complete(store, acked_rev)
        if step == "purge" and op == "replace":
            assert writer.rev is not None and writer.rev > acked_rev  # the replace had committed before the kill
        # writes go on, in the directories the kill left (or never made)
        event = writer.commit([Write("create", "app.bsky.feed.post/9999999999999", {"text": "after"})])
        blocks = list(read_car(event.blocks).blocks.items())
        store.write_slices([SliceWrite(DID, event.rev, event.since, event.commit, writer.data, blocks)])
        assert store.compact(DID).compacted
        assert writer.rev is not None
        check_complete(store, writer.rev)
        assert dict(mst.walk(store.load_blocks(DID), writer.data)) == writer.records
        store.close()
    finally:
        close_all = getattr(db, "close_all", None)
        close_all() if close_all is not None else db.close()


def test_open_keeps_the_file_of_a_dead_writers_transaction_that_commits_while_it_recovers(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The killed process is gone (its lock is free) but its last transaction is still committing.

    On PostgreSQL the server finishes a COMMIT the client sent just before SIGKILL on its own
    time, possibly after the next ``open()`` listed the intents. Here the writer thread stops
    inside ``write_slices``' transaction (after deleting its intent, before the commit), its store
    is closed (the lock released, as by the kill), a second store opens in another thread, and the
    writer commits once the recovery reaches the intent. The slice must stay readable.
    """
    directory = tmp_path / "carstore"
    writer = RepoWriter(DID, PrivateKey.generate("k256"))
    dbs = [open_database(db_url), open_database(db_url)]
    dead, fresh = CarStore(directory, dbs[0]), CarStore(directory, dbs[1])
    in_commit, recovering = threading.Event(), threading.Event()
    real_delete = carstore_schema.delete_pending

    def delete_pending(db: peewee.Database, *tokens: str) -> int:
        if db is dbs[1]:
            recovering.set()
            return real_delete(db, *tokens)
        n = real_delete(db, *tokens)  # the dead writer: its intent row is locked until its commit
        in_commit.set()
        assert recovering.wait(WAIT_S), "open() never reached the intent"
        return n

    def write(i: int) -> None:
        event = writer.commit([Write("create", f"app.bsky.feed.post/{i:013d}", {"text": f"post {i}"})])
        blocks = list(read_car(event.blocks).blocks.items())
        dead.write_slices([SliceWrite(DID, event.rev, event.since, event.commit, writer.data, blocks)])

    try:
        dead.open()
        write(0)
        monkeypatch.setattr(carstore_schema, "delete_pending", delete_pending)
        writing = threading.Thread(target=write, args=(1,), daemon=True)
        writing.start()
        assert in_commit.wait(WAIT_S)
        dead.close()  # the process "dies": its lock goes, its transaction lives on
        errors: list[BaseException] = []

        def open_fresh() -> None:
            try:
                fresh.open()
            except BaseException as exc:
                errors.append(exc)

        opening = threading.Thread(target=open_fresh, daemon=True)
        opening.start()
        writing.join(WAIT_S)
        opening.join(WAIT_S)
        assert not writing.is_alive() and not opening.is_alive() and not errors, errors
        monkeypatch.setattr(carstore_schema, "delete_pending", real_delete)
        assert writer.rev is not None
        check_complete(fresh, writer.rev)  # before the fix: the slice's row live, its file unlinked
        fresh.close()
    finally:
        for db in dbs:
            close_all = getattr(db, "close_all", None)
            close_all() if close_all is not None else db.close()
