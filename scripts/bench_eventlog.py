"""Benchmark of store.eventlog: append+sync records/s and replay records/s through read_after.

Usage: python scripts/bench_eventlog.py [--records 200000] [--batch 1000] [--frame-bytes 2048] [--dir DIR]

Appends ``--records`` records of ``--frame-bytes`` in batches of ``--batch``, one ``sync()``
(one fsync) per batch, into 64 MiB segments, with SQLite metadata beside them. Then replays
everything with ``read_after(cursor, 1000)``: first with the writer's own instance, then with
a freshly opened one (which crc-checks each sealed segment the first time it reads it), and
times seeks to random cursors. Files go to a temporary folder under ``--dir`` (default: the
system's), removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from store.db import open_database
from store.eventlog import EventLog, LogRecord
from store.migrations import apply_migrations


def replay(log: EventLog) -> tuple[int, float]:
    """(records, seconds) to read the whole log from cursor 0 in calls of 1,000."""
    n = 0
    cursor = 0
    start = time.perf_counter()
    while batch := log.read_after(cursor, 1000):
        n += len(batch)
        cursor = batch[-1][0]
    return n, time.perf_counter() - start


def report(label: str, n: int, secs: float, mib: float, note: str) -> None:
    rate = f"{n / secs:>10,.0f} records/s  {secs / n * 1e6:6.2f} us/record  {mib / secs:7.1f} MiB/s"
    print(f"{label:<12} {rate}  ({note})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--frame-bytes", type=int, default=2048)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-eventlog-", dir=args.dir) as tmp:
        db = open_database(f"sqlite:///{tmp}/bench.sqlite")
        apply_migrations(db)
        logdir = Path(tmp) / "log"
        frame = os.urandom(args.frame_bytes)
        now = time.time()
        batches = [
            [LogRecord(s, now, 1 + s % 50, s, frame) for s in range(b, min(b + args.batch, args.records + 1))]
            for b in range(1, args.records + 1, args.batch)
        ]

        log = EventLog(logdir, db)
        log.open()
        per_batch = []
        in_append = 0.0
        start = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            log.append(batch)
            t1 = time.perf_counter()
            log.sync()
            in_append += t1 - t0
            per_batch.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        mib = args.records * (args.frame_bytes + 44) / 2**20
        note = f"batch {args.batch} x {args.frame_bytes} B, one fsync each; per batch median"
        note += f" {statistics.median(per_batch) * 1e3:.2f} ms, max {max(per_batch) * 1e3:.2f} ms"
        report("append+sync", args.records, elapsed, mib, note)
        print(
            f"{'':<12} of which append() {in_append / args.records * 1e6:.2f} us/record (encode, crc, write),"
            f" sync() {(elapsed - in_append) / args.records * 1e6:.2f} us/record (fdatasync)"
        )

        n, secs = replay(log)
        assert n == args.records, n
        report("replay", n, secs, mib, "the writer's instance")
        log.close()

        fresh = EventLog(logdir, db)
        t0 = time.perf_counter()
        fresh.open(checkpoint_seq=args.records)
        opened = time.perf_counter() - t0
        n, secs = replay(fresh)
        note = f"reopened (open {opened * 1e3:.0f} ms), first reads crc-check each sealed segment"
        report("replay", n, secs, mib, note)
        n, secs = replay(fresh)
        report("replay", n, secs, mib, "reopened, second pass")

        rng = random.Random(1)
        cursors = [rng.randrange(0, args.records) for _ in range(2000)]
        t0 = time.perf_counter()
        for c in cursors:
            assert fresh.read_after(c, 1)[0][0] == c + 1
        seek_us = (time.perf_counter() - t0) / len(cursors) * 1e6
        print(f"{'seek':<12} {seek_us:10.1f} us per read_after(random cursor, 1)")
        fresh.close()
        db.close()


if __name__ == "__main__":
    main()
