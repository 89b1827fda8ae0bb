"""The carstore survives SIGKILL at any moment: every account reads back at (at least) its last acknowledged rev.

A child process writes slices for a dozen accounts as fast as it can (random creates, updates
and deletes, batches mixing accounts, now and then a whole-repo ``replace_repo``), printing
``did rev`` for every write once ``write_slices``/``replace_repo`` has returned. In the
``compact`` variant a second thread compacts the same accounts in a loop meanwhile. The test
kills the child after a random number of acknowledgements, reopens the store (which removes
orphans and superseded files) and checks every account: head at or past its last acknowledged
rev, the whole repo reachable from the head (commit, every MST node, every record: no
``MissingBlock``), no file without a live row and no row without its file. Each round's child
resumes the accounts from what the mirror holds, so writes stack on recovered state.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protocol import mst
from protocol.commit import decode_commit
from store.carstore import CarStore
from store.carstore_compact import repo_blocks
from store.db import open_database

REPO_ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 6  # kills per variant and database

CHILD = """
import random, sys, threading, traceback
from pathlib import Path
from protocol import mst
from protocol.car import read_car
from protocol.crypto import PrivateKey
from protocol.repo_writer import RepoWriter, Write
from store.carstore import CarStore, SliceWrite
from store.db import open_database

url, directory, mode, seed = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
store = CarStore(directory, open_database(url))
store.open()
rng = random.Random(seed)
key = PrivateKey.generate("k256")
dids = [f"did:plc:crash{i:02d}" for i in range(12)]
out = threading.Lock()

def say(line):
    with out:
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

def resume(did):
    w = RepoWriter(did, key)
    head = store.head(did)
    if head is not None:
        w.blocks = store.load_blocks(did)
        w.data, w.rev, w.commit_cid = head.data_cid, head.rev, head.commit_cid
        w.records = dict(mst.walk(w.blocks, w.data))
    return w

def slice_of(w, event):
    blocks = list(read_car(event.blocks).blocks.items())
    return SliceWrite(w.did, event.rev, event.since, event.commit, w.data, blocks)

def compact_forever():
    try:
        while True:
            for did in dids:
                if store.compact(did).compacted:
                    say(f"compacted {did}")
    except BaseException:
        say("error " + traceback.format_exc().replace("\\n", " | "))

writers = {did: resume(did) for did in dids}
say("opened")
if mode == "compact":
    threading.Thread(target=compact_forever, daemon=True).start()
n = 0
while True:
    n += 1
    if rng.random() < 0.04:
        w = writers[rng.choice(dids)]
        if w.rev is not None:
            car = read_car(w.repo_car(), max_blocks=1 << 30)
            store.replace_repo(SliceWrite(w.did, w.rev, None, w.commit_cid, w.data, list(car.blocks.items())))
            say(f"{w.did} {w.rev}")
        continue
    batch = []
    for _ in range(rng.randint(1, 12)):
        w = writers[rng.choice(dids)]
        live = sorted(w.records)
        roll = rng.random()
        if live and roll < 0.2:
            op = Write("update", rng.choice(live), {"text": f"edit {n}"})
        elif live and roll < 0.3:
            op = Write("delete", rng.choice(live))
        else:
            op = Write("create", f"app.bsky.feed.post/{n:08d}{rng.randrange(10**6):06d}", {"text": f"post {n}"})
        batch.append(slice_of(w, w.commit([op])))
    store.write_slices(batch)
    for s in batch:
        say(f"{s.did} {s.rev}")
"""


def _pump(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line.decode())
    lines.put(None)


def run_and_kill(
    script: Path, db_url: str, directory: Path, mode: str, seed: int, acks: int, extra_s: float
) -> tuple[dict[str, str], int]:
    """Run the child until it acknowledged ``acks`` writes, and ``extra_s`` more; SIGKILL it.

    Returns (did -> last acknowledged rev, compactions seen). ``extra_s`` moves the kill off
    the instant an acknowledgement is printed, to anywhere in the next write.
    """
    proc = subprocess.Popen(
        [sys.executable, str(script), db_url, str(directory), mode, str(seed)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    acked: dict[str, str] = {}
    compactions = written = 0
    errors: list[str] = []

    def take(line: str) -> None:
        nonlocal compactions, written
        if line.startswith("error"):
            errors.append(line)
        elif line.startswith("compacted"):
            compactions += 1
        elif line.startswith("did:"):
            did, rev = line.split()
            acked[did] = max(rev, acked.get(did, ""))
            written += 1

    deadline = time.monotonic() + 90
    try:
        while written < acks or (mode == "compact" and compactions == 0):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, proc.stderr.read().decode() if proc.stderr else "child exited"
            take(line)
            assert time.monotonic() < deadline, "the child is too slow"
        kill_at = time.monotonic() + extra_s
        while (left := kill_at - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            assert line is not None, "child exited"
            take(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    reader.join(timeout=30)
    while (line := lines.get(timeout=5)) is not None:
        if line.endswith("\n"):  # a line cut by the kill was not acknowledged
            take(line)
    if proc.stderr:
        proc.stderr.close()
    assert not errors, errors
    return acked, compactions


def check_store(store: CarStore, db_url: str, acked: dict[str, str], round_: int) -> None:
    for did, rev in acked.items():
        head = store.head(did)
        assert head is not None, f"round {round_}: {did} lost"
        assert head.rev >= rev, f"round {round_}: {did} at {head.rev}, acknowledged {rev}"
        blocks = store.load_blocks(did)
        assert decode_commit(blocks[head.commit_cid]).data == head.data_cid
        list(mst.walk(blocks, head.data_cid))  # a complete, valid tree: no MissingBlock
        repo_blocks(blocks, head.commit_cid)  # and every record present
    rows = store._db.execute_sql("SELECT path, superseded FROM car_slice").fetchall()
    assert not any(superseded for _, superseded in rows), f"round {round_}: superseded rows left"
    slices = store.directory / "slices"
    on_disk = {str(p.relative_to(slices)) for p in slices.rglob("*") if p.is_file()}  # packs and single-slice CARs
    assert on_disk == {path for path, _ in rows}, f"round {round_}: files and rows disagree"
    assert store._db.execute_sql("SELECT COUNT(*) FROM car_pending").fetchone()[0] == 0


@pytest.mark.parametrize("mode", ["write", "compact"])
def test_sigkill_leaves_every_account_readable_at_its_acknowledged_rev(
    tmp_path: Path, db_url: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    directory = tmp_path / "carstore"
    db = open_database(db_url)
    rng = random.Random(f"{mode}-crash")
    acked_ever: dict[str, str] = {}
    recovered: list[str] = []
    total_compactions = 0
    caplog.set_level(logging.INFO, logger="store.carstore")
    for round_ in range(ROUNDS):
        acks, extra_s = rng.randint(20, 400), rng.uniform(0, 0.05)
        acked, compactions = run_and_kill(script, db_url, directory, mode, round_, acks, extra_s)
        total_compactions += compactions
        for did, rev in acked.items():
            acked_ever[did] = max(rev, acked_ever.get(did, ""))
        caplog.clear()
        store = CarStore(directory, db)
        store.open()
        recovered += [r.getMessage() for r in caplog.records if r.getMessage().startswith("carstore opened")]
        check_store(store, db_url, acked_ever, round_)
        store.close()
    assert len(acked_ever) == 12
    if mode == "compact":
        assert total_compactions > 0
    print(f"\n{mode}: {len(recovered)} recoveries, {total_compactions} compactions:", *recovered, sep="\n  ")
    close_all = getattr(db, "close_all", None)
    close_all() if close_all is not None else db.close()
