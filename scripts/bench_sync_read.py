"""Benchmark of the sync read API over HTTP: p50/p99 of each read on a mirrored repo, and getRepo's memory.

Usage: python scripts/bench_sync_read.py [--records 10000] [--large-records 100000] [--calls 400]
                                         [--database-url postgresql://...]

A ``--records``-record repo (signed commits made with ``protocol.repo_writer``, as the unit
tests make them) is mirrored as 10 commit slices in 10 pack files, plus a ``--large-records``
one likewise (in commits of at most 5,000 records). A server process runs the relay's real Flask app (``web.xrpc_sync``,
``web.xrpc_repo`` over ``actors.relay_reads.SyncReads``) on the relay's own HTTP server
(``RelayWSGIServer``, gevent monkey-patched, reads in the thread pool) on loopback; a client on
one kept-alive connection times getLatestCommit, getRepoStatus, getRecord (random records),
getHostStatus, listRepos and a full getRepo, and prints p50/p99. Then the server's peak RSS
growth (``VmHWM`` after ``clear_refs``) while streaming getRepo of the large repo, first
request (its slice indexes built and cached) and again, beside the CAR's size. Everything is
run again after compacting both repos (getRepo then copies one file range).

The databases are one SQLite file, or with ``--database-url`` a fresh PostgreSQL schema
(dropped at the end). The first calls of each kind are a warm-up, not timed.
"""

from __future__ import annotations

import sys

if "--serve" in sys.argv:  # the server process: gevent first, as ``skyrelay serve`` does
    from gevent import monkey

    monkey.patch_all()

import argparse
import http.client
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.relay_reads import SyncReads  # noqa: E402
from scripts.bench_mirror import build_repo  # noqa: E402
from scripts.benchkit.relays import fresh_database_url  # noqa: E402
from store.accounts import AccountRow, upsert_accounts  # noqa: E402
from store.carstore import CarStore  # noqa: E402
from store.db import open_database  # noqa: E402
from store.hosts import ensure_host  # noqa: E402
from store.migrations import apply_migrations  # noqa: E402

SMALL = "did:plc:benchsmall0000000000000000"
LARGE = "did:plc:benchlarge0000000000000000"
HOST = "pds.bench.example"


class _Services:
    def __init__(self, blueprints: list[Any]) -> None:
        self._blueprints = blueprints

    def health(self) -> bool:
        return True

    def blueprints(self) -> list[Any]:
        return self._blueprints


def serve(folder: Path, url: str) -> None:
    """The server process: the real app on ``RelayWSGIServer``; prints its port, runs until killed."""
    from web.app import create_app
    from web.httpserver import RelayWSGIServer
    from web.xrpc_repo import repo_blueprint
    from web.xrpc_sync import sync_blueprint

    db, car_db = open_database(url), open_database(url)
    store = CarStore(folder / "repos", car_db, fsync=False)
    store.open()
    reads = SyncReads(db, store)
    app = create_app(_Services([sync_blueprint(db=db, host_supervisor=None, insecure=True, reads=reads),
                                repo_blueprint(reads=reads)]))  # fmt: skip
    server = RelayWSGIServer(("127.0.0.1", 0), app)
    server.start()
    print(server.server_port, flush=True)
    server.serve_forever()


def build(folder: Path, url: str, records: int, large: int) -> dict[str, list[str]]:
    """Both repos mirrored (10 slices each, one pack file each) and their accounts; the record paths."""
    db = open_database(url)
    apply_migrations(db)
    store = CarStore(folder / "repos", open_database(url), fsync=False)
    store.open()
    paths = {}
    with db.connection_context():
        host = ensure_host(db, HOST)
        for did, n in ((SMALL, records), (LARGE, large)):
            writer, slices = build_repo(did, n, commits=max(10, n // 5000))  # a commit's CAR: < 10,000 blocks
            for s in slices:
                store.write_slices([s])
            with db.atomic():
                upsert_accounts(db, [AccountRow(did, host.id, "active", "active", writer.rev, writer.commit_cid,
                                                writer.data, False)])  # fmt: skip
            paths[did] = sorted(writer.records)
    store.close()
    db.close()
    return paths


def compact(folder: Path, url: str) -> None:
    store = CarStore(folder / "repos", open_database(url), fsync=False)
    store.open()
    for did in (SMALL, LARGE):
        store.compact(did)
    store.close()


class Server:
    def __init__(self, folder: Path, url: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), url], stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def get(self, path: str, sink: Callable[[bytes], None] | None = None) -> int:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        size = 0
        while chunk := resp.read(256 * 1024):
            size += len(chunk)
            if sink:
                sink(chunk)
        assert resp.status == 200, (path, resp.status)
        return size

    def status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def peak_growth_kib(self, fn: Callable[[], Any]) -> int:
        """How far the server's RSS peaked above where it was while ``fn`` ran."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = self.status_kib("VmRSS")
        fn()
        return self.status_kib("VmHWM") - before

    def stop(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(10)


def timed(server: Server, paths: Callable[[], str], calls: int) -> tuple[float, float]:
    for _ in range(max(3, calls // 20)):  # warm-up: connections, caches, indexes
        server.get(paths())
    samples = []
    for _ in range(calls):
        path = paths()
        t0 = time.perf_counter()
        server.get(path)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples) * 1000, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000


def run(server: Server, records: dict[str, list[str]], calls: int, label: str) -> None:
    rng = random.Random(1)
    base = "/xrpc/com.atproto.sync."
    small = records[SMALL]

    def record() -> str:
        collection, rkey = rng.choice(small).split("/")
        return f"{base}getRecord?did={SMALL}&collection={collection}&rkey={rkey}"

    cases: list[tuple[str, Callable[[], str], int]] = [
        ("/_health (no read: the HTTP floor)", lambda: "/_health", calls),
        ("getLatestCommit", lambda: f"{base}getLatestCommit?did={SMALL}", calls),
        ("getRepoStatus", lambda: f"{base}getRepoStatus?did={SMALL}", calls),
        ("getRecord", record, calls),
        ("getHostStatus", lambda: f"{base}getHostStatus?hostname={HOST}", calls),
        ("listRepos", lambda: f"{base}listRepos", calls),
        (f"getRepo ({len(small):,} records)", lambda: f"{base}getRepo?did={SMALL}", max(10, calls // 20)),
    ]
    print(f"\n{label}")
    print(f"{'call':<34}{'calls':>7}{'p50 ms':>10}{'p99 ms':>10}")
    for name, path, n in cases:
        p50, p99 = timed(server, path, n)
        print(f"{name:<34}{n:>7}{p50:>10.2f}{p99:>10.2f}")
    big = f"{base}getRepo?did={LARGE}"
    sizes: list[int] = []
    first = server.peak_growth_kib(lambda: sizes.append(server.get(big)))
    again = server.peak_growth_kib(lambda: sizes.append(server.get(big)))
    print(f"getRepo of {len(records[LARGE]):,} records ({sizes[0] / 2**20:.1f} MiB CAR): server peak RSS growth "
          f"{first / 1024:.1f} MiB first request, {again / 1024:.1f} MiB again")  # fmt: skip


def main() -> None:
    if "--serve" in sys.argv:
        i = sys.argv.index("--serve")
        serve(Path(sys.argv[i + 1]), sys.argv[i + 2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--large-records", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=400, help="timed calls of each small read")
    parser.add_argument("--database-url", default="", help="PostgreSQL server (a fresh schema); SQLite if empty")
    parser.add_argument("--dir", default=None, help="folder for the temporary data")
    args = parser.parse_args()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-sync-read-")))
        url = fresh_database_url(args.database_url, folder, stack, keep=False)
        t0 = time.perf_counter()
        records = build(folder, url, args.records, args.large_records)
        kind = "PostgreSQL" if args.database_url else "SQLite"
        large_slices = max(10, args.large_records // 5000)
        print(f"{kind}; built {args.records:,} + {args.large_records:,} record repos in "
              f"{time.perf_counter() - t0:.1f} s (10 and {large_slices} slices); "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        for label, step in (
            ("uncompacted (commit slices, one pack file each)", None),
            ("after compaction (one file per repo)", compact),
        ):
            if step:
                step(folder, url)
            server = Server(folder, url)
            try:
                run(server, records, args.calls, label)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
