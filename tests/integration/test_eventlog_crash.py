"""The event log survives SIGKILL at any moment: no gap, no duplicate, no torn record, nothing synced lost.

A child process appends and syncs batches as fast as it can, printing the last seq of each
synced batch; the test kills it mid-run (every other round also tearing a record onto the
end, as a write cut short would), recovers the log in-process and checks every record.
Several rounds, each child continuing the log the previous one left, so recovery after a
crash is itself crashed into.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from store.db import open_database
from store.eventlog import EventLog, LogRecord
from store.migrations import apply_migrations
from store.segments import HEADER, HEADER_SIZE, encode_run

REPO_ROOT = Path(__file__).resolve().parents[2]
SEGMENT_MAX_BYTES = 256 * 1024  # small, so kills also land around segment rolls

CHILD = f"""
import sys, time
from pathlib import Path
from store.db import open_database
from store.eventlog import EventLog, LogRecord
from store.migrations import apply_migrations

def frame(seq):
    return seq.to_bytes(8, "little") * (1 + seq % 300)

db = open_database(sys.argv[1])
apply_migrations(db)
log = EventLog(Path(sys.argv[2]), db, segment_max_bytes={SEGMENT_MAX_BYTES})
seq = log.open().last_seq
print("opened", seq, flush=True)
while True:
    batch = [LogRecord(s, time.time(), 1 + s % 4, s * 2, frame(s)) for s in range(seq + 1, seq + 2 + seq % 97)]
    log.append(batch)
    log.sync()
    seq = batch[-1].seq
    sys.stdout.write(f"{{seq}}\\n")
    sys.stdout.flush()
"""


def frame(seq: int) -> bytes:
    return seq.to_bytes(8, "little") * (1 + seq % 300)


def tear_newest_segment(logdir: Path, rng: random.Random | None) -> int:
    """With ``rng``, append a strict prefix of a next record to the newest segment, as a cut write would.

    Returns how many bytes recovery must cut: those, plus any partial record the kill left.
    """
    newest = max(logdir.glob("*.seg"))
    data = newest.read_bytes()
    good = last_seq = 0
    while good + HEADER_SIZE <= len(data):
        _magic, length, _crc, seq, *_ = HEADER.unpack_from(data, good)
        if good + HEADER_SIZE + length > len(data):
            break
        good, last_seq = good + HEADER_SIZE + length, seq
    if rng is None:
        return len(data) - good
    record = encode_run([LogRecord(last_seq + 1, time.time(), 1, 0, frame(last_seq + 1))], 0, 0)[0]
    torn = record[: rng.randrange(1, len(record))]
    with newest.open("ab") as f:
        f.write(torn)
    return len(data) - good + len(torn)


def _pump(stream: object, lines: queue.Queue[bytes | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)
    lines.put(None)


def run_and_kill(script: Path, db_url: str, logdir: Path, synced_batches: int) -> tuple[int, list[int]]:
    """Run the child until it reports ``synced_batches`` syncs, SIGKILL it; (start seq, every synced seq)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), db_url, str(logdir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: queue.Queue[bytes | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    synced: list[int] = []
    start = -1
    try:
        while len(synced) < synced_batches:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, proc.stderr.read().decode() if proc.stderr else ""
            if line.startswith(b"opened"):
                start = int(line.split()[1])
            else:
                synced.append(int(line))
            assert time.monotonic() < deadline, "the child is too slow"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    reader.join(timeout=30)
    while (line := lines.get(timeout=5)) is not None:
        if line.endswith(b"\n"):  # a line cut by the kill was not reported
            synced.append(int(line))
    if proc.stderr:
        proc.stderr.close()
    return start, synced


def test_sigkill_mid_run_loses_nothing_synced(tmp_path: Path, db_url: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    logdir = tmp_path / "log"
    db = open_database(db_url)
    apply_migrations(db)
    last = 0
    for round_, batches in enumerate([40, 173, 311, 89]):
        start, synced = run_and_kill(script, db_url, logdir, batches)
        assert start == last, f"round {round_}: the child started at {start}, the log ended at {last}"
        assert synced and synced == sorted(synced) and synced[0] > start
        to_cut = tear_newest_segment(logdir, random.Random(round_) if round_ % 2 else None)

        log = EventLog(logdir, db, segment_max_bytes=SEGMENT_MAX_BYTES)
        info = log.open()
        assert info.truncated_bytes == to_cut
        seqs: list[int] = []
        cursor = 0
        while batch := log.read_after(cursor, 500):
            for seq, data in batch:
                assert data == frame(seq), f"round {round_}: seq {seq} has a damaged frame"
            seqs += [s for s, _ in batch]
            cursor = batch[-1][0]
        assert seqs == list(range(1, len(seqs) + 1)), f"round {round_}: a gap or a duplicate"
        assert info.last_seq == len(seqs) >= synced[-1], f"round {round_}: synced seq {synced[-1]} lost"
        assert info.host_cursors == {h: 2 * max(s for s in seqs if 1 + s % 4 == h) for h in range(1, 5)}
        rows = db.execute_sql("SELECT path FROM log_segment").fetchall()
        assert sorted(r[0] for r in rows) == sorted(p.name for p in logdir.glob("*.seg"))
        log.close()
        last = info.last_seq
    assert len(list(logdir.glob("*.seg"))) > 3
    db.close()
